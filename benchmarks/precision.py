"""Raw forward speed of a model at fp32 and bf16 side by side, and what ``precision=auto`` picks.

    python benchmarks/precision.py                      # the embedded default model
    python benchmarks/precision.py --weights my.pt --batch 64 --threads 2

Prints one JSON object: the CPU (model name, torch's capability, native bf16/AMX), patches/s at each
precision (best of ``--repeats`` timed passes after a warm-up), the precision ``auto`` chose and why,
and whether that choice is within 5% of the fastest measured path (the issue's target). The probe
that ``auto`` runs is cached per machine (nuclick_wsi/model/precision.py); ``--fresh`` ignores the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fresh", action="store_true", help="Probe again instead of using the cached choice.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh:
        os.environ["NUCLICK_WSI_CACHE_DIR"] = tempfile.mkdtemp(prefix="nuclick-precision-")
    from nuclick_wsi.model.weights import load_model
    from nuclick_wsi.model.precision import cpu_description, probe_speed
    from nuclick_wsi.model.predictor import Predictor

    model = load_model(args.weights)
    dev = torch.device("cpu")
    net = model.net.eval().to(memory_format=torch.channels_last)
    speeds = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        speeds[name] = round(probe_speed(net, dev, dtype, patch_size=model.patch_size, batch=args.batch,
                                         repeats=args.repeats), 1)
    chosen = Predictor(model, "cpu", "auto").precision
    fastest = max(speeds, key=speeds.get)
    print(json.dumps({
        "cpu": cpu_description(), "torch": torch.__version__,
        "model": {"source": Path(model.source).name, "arch": model.arch, "arch_args": model.arch_args,
                  "patch_size": model.patch_size},
        "batch": args.batch, "patches_per_s": speeds,
        "auto": {"name": chosen.name, "reason": chosen.reason},
        "auto_within_5pct_of_fastest": speeds[chosen.name] >= 0.95 * speeds[fastest],
    }, indent=1))


if __name__ == "__main__":
    main()
