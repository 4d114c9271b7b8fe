"""Raw forward speed of a model at fp32 and bf16, on PyTorch and OpenVINO, and what ``auto`` picks.

    python benchmarks/precision.py                      # the embedded default model
    python benchmarks/precision.py --weights my.pt --batch 64 --threads 2

Prints one JSON object: the CPU (model name, torch's capability, native bf16/AMX), patches/s at each
precision and runtime (best of ``--repeats`` timed passes after a warm-up; OpenVINO when installed),
the precision and runtime ``auto`` chose and why, and whether that choice is within 5% of the fastest
measured path (the issue's target). The probe
that ``auto`` runs is cached per machine (nuclick_wsi/model/precision.py); ``--fresh`` ignores the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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
    from nuclick_wsi.errors import NuclickError
    from nuclick_wsi.model.runtime import OpenVinoNet, openvino_version

    model = load_model(args.weights)
    dev = torch.device("cpu")
    net = model.net.eval().to(memory_format=torch.channels_last)
    speeds = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        speeds[f"torch {name}"] = round(probe_speed(net, dev, dtype, patch_size=model.patch_size, batch=args.batch,
                                                    repeats=args.repeats), 1)
    if openvino_version():
        x = np.random.default_rng(0).random((args.batch, 5, model.patch_size, model.patch_size), dtype=np.float32)
        for name in ("fp32", "bf16"):
            try:
                compiled = OpenVinoNet(net, patch_size=model.patch_size, precision=name)
            except NuclickError as exc:  # bf16 on a CPU (or oneDNN ISA cap) without it
                speeds[f"openvino {name}"] = None
                print(f"openvino {name}: {exc}", file=sys.stderr)
                continue
            compiled(x)
            best = min(_timed(compiled, x) for _ in range(args.repeats))
            speeds[f"openvino {name}"] = round(args.batch / best, 1)
    os.environ.pop("NUCLICK_WSI_RUNTIME", None)
    chosen = Predictor(model, "cpu", "auto", runtime="auto")
    key = f"{chosen.runtime.name} {chosen.precision.name}"
    speeds_ok = {k: v for k, v in speeds.items() if v is not None}
    fastest = max(speeds_ok, key=speeds_ok.get)
    print(json.dumps({
        "cpu": cpu_description(), "torch": torch.__version__, "openvino": openvino_version(),
        "model": {"source": Path(model.source).name, "arch": model.arch, "arch_args": model.arch_args,
                  "patch_size": model.patch_size},
        "batch": args.batch, "patches_per_s": speeds,
        "auto": {"precision": chosen.precision.name, "precision_reason": chosen.precision.reason,
                 "runtime": chosen.runtime.name, "runtime_reason": chosen.runtime.reason},
        "auto_within_5pct_of_fastest": speeds[key] >= 0.95 * speeds_ok[fastest],
    }, indent=1))


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
