"""Benchmark `nuclick-wsi segment` end to end on a generated slide with thousands of clicks.

Prints nuclei/s, peak RSS of the segment process, and the read / infer / post / write split.

    python benchmarks/segment.py                       # 40000 x 30000 slide, 5000 clicks, default model
    python benchmarks/segment.py --width 100000 --height 80000 --clicks 20000
    python benchmarks/segment.py --device cuda
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/segment.py   # as on a CPU without AVX512/bf16

The slide is a tiled TIFF at 0.25 um/px with dark elliptic "nuclei" on a pink background, written
tile by tile (never whole in memory); clicks sit inside the nuclei, in clusters. The segment run is a
child process, so its peak RSS is its own (resource.getrusage of the child).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_slide(path: Path, width: int, height: int, n_clicks: int, seed: int = 0, tile: int = 512,
               spacing: float = 22.0) -> np.ndarray:
    """Write the slide; return click positions (n, 2) as level-0 x, y (nuclei ``spacing`` px apart in clusters)."""
    import tifffile

    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_clicks // 400)
    centres = rng.uniform([2000, 2000], [width - 2000, height - 2000], (n_clusters, 2))
    pts = []
    per = n_clicks // n_clusters
    for c in centres:  # nuclei on a jittered grid, `spacing` px apart, around each cluster centre
        side = int(np.ceil(np.sqrt(per)))
        gy, gx = np.mgrid[0:side, 0:side]
        xy = np.stack([gx.ravel(), gy.ravel()], 1)[:per] * spacing + c - side * spacing / 2 + rng.normal(0, 2.5, (per, 2))
        pts.append(xy)
    pts = np.concatenate(pts)[:n_clicks]
    radii = rng.uniform(5, 9, (len(pts), 2))
    tiles_y, tiles_x = -(-height // tile), -(-width // tile)
    # bucket nuclei per tile (a nucleus may touch up to 4 tiles)
    buckets: dict[tuple[int, int], list[int]] = {}
    for k, (x, y) in enumerate(pts):
        for ty in range(int((y - 10) // tile), int((y + 10) // tile) + 1):
            for tx in range(int((x - 10) // tile), int((x + 10) // tile) + 1):
                buckets.setdefault((ty, tx), []).append(k)
    yy, xx = np.mgrid[0:tile, 0:tile]
    bg = np.array([235, 200, 220], np.uint8)

    def tiles():
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                t = np.empty((tile, tile, 3), np.uint8)
                t[:] = bg
                for k in buckets.get((ty, tx), ()):
                    x, y = pts[k][0] - tx * tile, pts[k][1] - ty * tile
                    rx, ry = radii[k]
                    m = ((xx + 0.5 - x) / rx) ** 2 + ((yy + 0.5 - y) / ry) ** 2 <= 1
                    t[m] = (90, 50, 140)
                yield t

    res = 1e4 / 0.25
    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER", bigtiff=True)
    return pts


def _cpu() -> dict:
    """The CPU as torch sees it (ATEN_CPU_CAPABILITY=avx2 makes an AVX512 machine run torch's AVX2 kernels)."""
    import os
    import platform

    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(), "nproc": os.cpu_count(),
            "model": platform.processor() or platform.machine(),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=40000)
    ap.add_argument("--height", type=int, default=30000)
    ap.add_argument("--clicks", type=int, default=5000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--precision", default="auto", help="auto (measured), fp32 or bf16; the report says what ran.")
    ap.add_argument("--runtime", default="auto", help="auto (measured), torch or openvino; the report says what ran.")
    ap.add_argument("--workdir", default=None, help="Keep the generated slide here (reused when present).")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nuclick-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"bench-{args.width}x{args.height}-{args.clicks}.tif"
    clicks = slide.with_suffix(".csv")
    if not (slide.exists() and clicks.exists()):
        t = time.time()
        pts = make_slide(slide, args.width, args.height, args.clicks)
        np.savetxt(clicks, pts, delimiter=",", fmt="%.2f")
        print(f"generated {slide.name} ({slide.stat().st_size / 1e6:.1f} MB) in {time.time() - t:.1f} s", file=sys.stderr)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a rerun of the last one
    cmd = [sys.executable, "-m", "nuclick_wsi.cli", "segment", str(slide), "--points", str(clicks), "-o", str(out),
           "--quiet", "--device", args.device, "--batch-size", str(args.batch_size), "--no-qc",
           "--precision", args.precision, "--runtime", args.runtime]
    if args.weights:
        cmd += ["--weights", args.weights]
    t = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    rep = json.loads((out / f"{slide.stem}.report.json").read_text())
    tm = rep["timings_s"]
    n = rep["totals"]["segmented"]
    other = tm["read"] + tm["post"] + tm["write"]
    print(json.dumps({
        "slide": f"{args.width} x {args.height}", "clicks": args.clicks, "segmented": n, "device": rep["device"],
        "precision": rep.get("precision"), "runtime": rep.get("runtime"), "model": rep["model"]["arch"], "cpu": _cpu(),
        "nuclei_per_s_pipeline": tm["nuclei_per_s"], "nuclei_per_s_process": round(n / wall, 1),
        "process_wall_s": round(wall, 2), "pipeline_wall_s": tm["wall"], "peak_rss_gib": round(rss_gib, 3),
        "busy_s": {k: tm[k] for k in ("read", "infer", "post", "write")},
        "read_post_write_share_of_wall": round(other / tm["wall"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
