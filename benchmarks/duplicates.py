"""Duplicate clicks at one spot: peak memory and time of the duplicate check (issue 12, case 4).

Each case runs in its own subprocess (so its peak RSS is its own): N clicks at one point on a
100,000 px slide, checked with ``segment``'s rule (2 px). Prints one line per case: clicks, kept,
reported, seconds, peak RSS (MiB, ``resource.getrusage``), and the machine.

    python benchmarks/duplicates.py            # 10,000 and 100,000 clicks
    python benchmarks/duplicates.py 1000000    # other sizes

It then runs the whole ``nuclick-wsi segment`` (a 1024 px slide, a small random U-Net) on 100,000
clicks at one spot and reports its peak RSS (``RUSAGE_CHILDREN``) and the report's totals.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

CASE = """
import json, resource, sys, time
from types import SimpleNamespace
from nuclick_wsi.guidance.clicks import check_clicks
from nuclick_wsi.records import Click, Prompts
n = int(sys.argv[1])
prompts = Prompts(clicks=[Click(x=5000.5, y=5000.5) for _ in range(n)])
slide = SimpleNamespace(width=100_000, height=100_000)
t0 = time.perf_counter()
reasons = check_clicks(prompts, slide, 2.0)
dt = time.perf_counter() - t0
kept = sum(r is None for r in reasons)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"clicks": n, "kept": kept, "reported": n - kept, "seconds": round(dt, 3), "peak_rss_mib": round(rss, 1)}))
"""


def machine() -> str:
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informative only
        cap = "n/a"
    model = platform.processor() or ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"nproc={os.cpu_count()} cpu={model!r} capability={cap}"


def whole_segment(n: int) -> dict:
    """``nuclick-wsi segment`` on ``n`` clicks at one spot, in a child process; its peak RSS."""
    import resource
    import tempfile
    from pathlib import Path

    import numpy as np
    import tifffile
    import torch

    from nuclick_wsi.model.architectures.unet import LightUNet
    from nuclick_wsi.model.weights import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tifffile.imwrite(root / "s.tif", np.full((1024, 1024, 3), 200, np.uint8), photometric="rgb",
                         resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        (root / "c.csv").write_text("x,y\n" + "500.5,500.5\n" * n)
        torch.manual_seed(0)
        save_checkpoint(root / "w.pt", LightUNet((8, 16, 32, 64)), "light-unet", {"widths": [8, 16, 32, 64]},
                        {"mpp": 0.25, "patch_size": 128, "task": "nuclei", "postprocess": {"threshold": 0.3}})
        cmd = [sys.executable, "-m", "nuclick_wsi.cli", "segment", "s.tif", "-p", "c.csv", "-o", "out", "-q",
               "--weights", "w.pt", "--device", "cpu", "--precision", "fp32"]
        import time

        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if res.returncode:
            return {"segment": "failed", "stderr": res.stderr.strip()[-300:]}
        totals = json.loads((root / "out" / "s.report.json").read_text())["totals"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"segment_clicks": n, "segmented": totals["segmented"], "skipped_by_reason": totals["skipped_by_reason"],
            "seconds": round(dt, 2), "peak_rss_mib": round(rss, 1)}


def main(sizes: list[int]) -> int:
    print(machine())
    worst = 0.0
    for n in sizes:
        res = subprocess.run([sys.executable, "-c", CASE, str(n)], capture_output=True, text=True)
        if res.returncode:
            print(f"{n} clicks: failed ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode})")
            return 1
        row = json.loads(res.stdout)
        worst = max(worst, row["peak_rss_mib"])
        print(row)
    row = whole_segment(100_000)
    print(row)
    worst = max(worst, row.get("peak_rss_mib", 1e9))
    return 0 if worst <= 2048 else 1


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [10_000, 100_000]))
