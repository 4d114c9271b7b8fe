"""Benchmark `nuclick-wsi propose`: proposal F1, propose-then-segment AJI, speed, peak RSS, the detector's loop.

    python benchmarks/propose.py                        # every section
    python benchmarks/propose.py --section f1 aji       # held-out tiles only
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/propose.py --section speed rss

Sections:
  f1     proposal precision/recall/F1 on the held-out MoNuSeg tiles (a proposal matches the nucleus it
         falls inside, one to one), at 40x and read at 20x (scale 0.5)
  aji    propose, then NuClick on every proposal with no human between: AJI, Dice, PQ on the same tiles
  speed  megapixels of tissue (at 0.25 um/px) per second, `propose` in a child process on a generated
         slide that is all tissue (--speed-side px square)
  rss    peak RSS of `propose` on a generated 100k x 100k slide with three tissue islands
  loop   fine-tune the detector from clicks alone (ground-truth centroids) on two held-out tiles and
         score the other two, against the default detector

Generated slides are pyramidal JPEG-tiled TIFFs (like SVS) at 0.25 um/px (levels 1, 4, 16, 64): white glass, pink
tissue, dark "nuclei" on a jittered 24 px grid. Child processes report their own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEST_TILES = ["TCGA-21-5786-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1"]
#: MoNuSeg beside the repository (../shared/data), or $NUCLICK_SHARED_DATA; --data overrides
DATA = Path(os.environ.get("NUCLICK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "monuseg-train"
GRID = 24  #: generated nuclei: one per GRID x GRID cell


def _slide_tile(x0: int, y0: int, size: int, ds: int, islands, jitter: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """One tile of the generated slide at downsample ``ds`` (level pixels x0, y0)."""
    t = np.full((size, size, 3), 250, np.uint8)
    ys, xs = (np.arange(size) + y0 + 0.5) * ds, (np.arange(size) + x0 + 0.5) * ds
    for ix0, iy0, ix1, iy1 in islands:
        rs, cs = (ys >= iy0) & (ys < iy1), (xs >= ix0) & (xs < ix1)
        if rs.any() and cs.any():
            t[np.ix_(rs, cs)] = (235, 190, 215)
            if ds == 1:  # nuclei: one per cell, centre jittered, radius 5-8 px
                yy, xx = np.meshgrid(ys[rs], xs[cs], indexing="ij")
                cy, cx = (yy // GRID).astype(int), (xx // GRID).astype(int)
                j, r = jitter[cy % 64, cx % 64], radius[cy % 64, cx % 64]
                dy, dx = yy - (cy * GRID + GRID / 2 + j[..., 1]), xx - (cx * GRID + GRID / 2 + j[..., 0])
                sub = t[np.ix_(rs, cs)]
                sub[dx ** 2 + dy ** 2 <= r ** 2] = (90, 50, 140)
                t[np.ix_(rs, cs)] = sub
    return t


def make_slide(path: Path, width: int, height: int, islands, seed: int = 0, tile: int = 512) -> float:
    """Write the slide (never whole in memory); return its tissue area in megapixels at 0.25 um/px."""
    import tifffile

    rng = np.random.default_rng(seed)
    jitter, radius = rng.uniform(-3, 3, (64, 64, 2)), rng.uniform(5, 8, (64, 64))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate((1, 4, 16, 64)):
            w, h = -(-width // ds), -(-height // ds)
            tiles = (_slide_tile(x, y, tile, ds, islands, jitter, radius)
                     for y in range(0, h, tile) for x in range(0, w, tile))
            res = 1e4 / (0.25 * ds)
            tw.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0)
    return sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in islands) / 1e6


def run_child(slide: Path, out: Path, weights: str | None) -> dict:
    """`propose` in a child process; its summary, wall time and peak RSS (GiB)."""
    code = ("import json,sys; from nuclick_wsi.proposals import propose, ProposeOptions;"
            "from nuclick_wsi.detection.slide import DetectOptions;"
            "r = propose(sys.argv[1], sys.argv[2], weights=sys.argv[3] or None,"
            " options=ProposeOptions(detect=DetectOptions(progress=False)));"
            "print(json.dumps(r.summary))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    res = subprocess.run([sys.executable, "-c", code, str(slide), str(out), weights or ""], capture_output=True,
                         text=True)
    if res.returncode:
        sys.exit(f"propose failed on {slide}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    wall = time.time() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {**summary, "process_wall_s": round(wall, 2), "peak_rss_gib": round(max(rss, before) / 2 ** 20, 3)}


def section_f1(detector, data: Path) -> dict:
    from nuclick_wsi.evaluation.detection import evaluate_proposals
    from nuclick_wsi.evaluation.protocol import load_eval_tiles

    tiles = load_eval_tiles([str(data)], TEST_TILES)
    return {f"{'40x' if s == 1 else '20x'}": evaluate_proposals(tiles, detector, scale=s) for s in (1.0, 0.5)}


def section_aji(detector, data: Path, nuclick_weights: str | None = None) -> dict:
    from nuclick_wsi.evaluation.detection import propose_then_segment
    from nuclick_wsi.evaluation.protocol import load_eval_tiles
    from nuclick_wsi.model.weights import load_model

    tiles = load_eval_tiles([str(data)], TEST_TILES)
    return {f"{'40x' if s == 1 else '20x'}": propose_then_segment(tiles, detector, load_model(nuclick_weights), scale=s)
            for s in (1.0, 0.5)}


def section_loop(detector, data: Path, work: Path, minutes: float) -> dict:
    """Fine-tune from clicks only (ground-truth centroids) on two held-out tiles; score the other two."""
    from nuclick_wsi.evaluation.detection import evaluate_proposals
    from nuclick_wsi.evaluation.protocol import load_eval_tiles
    from nuclick_wsi.model.weights import load_model
    from nuclick_wsi.training.detect import DetectConfig, train_detector
    from nuclick_wsi.training.detect_data import DetectionItem

    tiles = load_eval_tiles([str(data)], TEST_TILES)
    tune, score = tiles[:2], tiles[2:]
    items = [DetectionItem(t.name, t.image, np.asarray(list(t.centroids.values())) + 0.5, t.mpp or 0.25) for t in tune]
    cfg = DetectConfig(data=[], output=str(work / "tuned.pt"), init=detector.source, epochs=100, samples_per_epoch=128,
                       lr=5e-4, max_minutes=minutes, val=["none"])
    t = time.time()
    train_detector(cfg, items, [], progress=False, log=lambda m: None)
    tuned = load_model(work / "tuned.pt", task="detect")
    return {"tuned_on": [t.name for t in tune], "scored_on": [t.name for t in score],
            "train_s": round(time.time() - t, 1),
            "default": evaluate_proposals(score, detector)["overall"],
            "fine_tuned": evaluate_proposals(score, tuned)["overall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", nargs="+", default=["f1", "aji", "speed", "rss", "loop"],
                    choices=["f1", "aji", "speed", "rss", "loop"])
    ap.add_argument("--weights", default=None, help="Detector checkpoint (default: the embedded detector).")
    ap.add_argument("--nuclick-weights", default=None,
                    help="NuClick model of the aji section (default: the embedded one, which has seen the test tiles; "
                         "benchmarks/models/nuclei-recipe-heldout.pt has not)")
    ap.add_argument("--speed-side", type=int, default=10000, help="Side of the all-tissue speed slide (px).")
    ap.add_argument("--rss-side", type=int, default=100000, help="Side of the large slide (px).")
    ap.add_argument("--loop-minutes", type=float, default=3.0)
    ap.add_argument("--workdir", default=None, help="Keep generated slides here (reused when present).")
    ap.add_argument("--data", type=Path, default=DATA, help="MoNuSeg training folder (images/, annotations/).")
    args = ap.parse_args()

    import torch

    from nuclick_wsi.model.weights import load_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nuclick-propose-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    detector = load_model(args.weights, task="detect")
    out: dict = {"detector": detector.source, "cpu": {"nproc": os.cpu_count(), "capability":
                 torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                 "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}}
    for name in args.section:
        t = time.time()
        if name == "f1":
            out["f1"] = section_f1(detector, args.data)
        elif name == "aji":
            out["aji"] = section_aji(detector, args.data, args.nuclick_weights)
        elif name == "loop":
            out["loop"] = section_loop(detector, args.data, work, args.loop_minutes)
        else:
            side = args.speed_side if name == "speed" else args.rss_side
            islands = ([(0, 0, side, side)] if name == "speed" else
                       [(10000, 10000, 16000, 16000), (50000, 40000, 56000, 46000), (80000, 80000, 86000, 86000)])
            slide = work / f"{name}-{side}.tif"
            if not slide.exists():
                t0 = time.time()
                make_slide(slide, side, side, islands)
                print(f"generated {slide.name} ({slide.stat().st_size / 1e6:.0f} MB) in {time.time() - t0:.0f} s",
                      file=sys.stderr)
            out[name] = run_child(slide, work / f"out-{name}", args.weights)
        print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
