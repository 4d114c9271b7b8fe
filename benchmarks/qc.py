"""Benchmark the QC report (S.qc.html + S.review.geojson) against `segment`'s wall time.

    python benchmarks/qc.py                          # the example slide and clicks, --precision fp32
    python benchmarks/qc.py --out OUT --stem S       # the QC alone, on outputs already in OUT
                                                     # (e.g. python benchmarks/segment.py --workdir W)

Runs `nuclick-wsi segment --no-qc` in a child process (its wall time is the report's `timings_s.wall`
plus the process's start), then the QC in another child process (`nuclick_wsi.qc.write_qc`, imports
included), and prints both, the ratio, the QC's peak RSS, and the machine (nproc, CPU model, torch's
CPU capability).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_QC_CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from nuclick_wsi.qc import write_qc
write_qc(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_qc(out: Path, stem: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _QC_CHILD, str(out), stem], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(ROOT / "examples" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--points", default=str(ROOT / "examples" / "CMU-1-Small-Region.clicks.geojson"))
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="Outputs already there: benchmark the QC alone.")
    ap.add_argument("--stem", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="QC runs (the median is shown).")
    args = ap.parse_args()
    import torch

    print(f"machine: nproc {os.cpu_count()}, {cpu_model()}, torch {torch.__version__} "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if args.out:
        out, stem = Path(args.out), args.stem
        seg_wall = json.loads((out / f"{stem}.report.json").read_text())["timings_s"]["wall"]
        print(f"segment (from {stem}.report.json): wall {seg_wall:.2f} s")
    else:
        out = Path(tempfile.mkdtemp(prefix="nuclick-qc-bench-"))
        stem = Path(args.slide).stem
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nuclick_wsi.cli", "segment", args.slide, "-p", args.points, "-o", str(out),
                        "--precision", args.precision, "--device", args.device, "--no-qc", "-q"], check=True)
        seg_wall = time.perf_counter() - t
        rep = json.loads((out / f"{stem}.report.json").read_text())
        print(f"segment --no-qc --precision {args.precision}: {rep['totals']['segmented']} outlines, "
              f"wall {seg_wall:.2f} s (process), {rep['timings_s']['wall']:.2f} s (report)")
    runs = sorted((run_qc(out, stem) for _ in range(max(1, args.repeat))), key=lambda r: r["seconds"])
    med = runs[len(runs) // 2]
    print(f"QC (write_qc, imports included): median {med['seconds']:.2f} s of {len(runs)} "
          f"(min {runs[0]['seconds']:.2f}, max {runs[-1]['seconds']:.2f}), peak RSS {med['peak_rss_mb']:.0f} MB")
    print(f"added to segment: {med['seconds']:.2f} s = {100 * med['seconds'] / seg_wall:.1f} % of its wall")
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
