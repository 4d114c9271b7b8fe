"""The loop, measured: fine-tune a model on "corrected" outlines of some held-out tiles, score the others.

    python benchmarks/corrections.py --weights runs/s2d/model.pt --work /tmp/loop \\
        --data ../shared/data/monuseg-train --minutes 8 [--both-ways]

For each held-out tile the script writes the tile as a slide (tiled TIFF with its um/px from the
ImageScope XML in the resolution tags) and its ground-truth outlines as QuPath GeoJSON, as if a
pathologist had corrected them; then it runs exactly what a user runs::

    nuclick-wsi train --slide A1.tif --annotations A1.geojson --slide A2.tif --annotations A2.geojson \\
        --init WEIGHTS --val none --lr LR --max-minutes M -o tuned.pt
    nuclick-wsi evaluate DATA --tiles B1,B2 --weights WEIGHTS|tuned.pt --no-baselines --json ...

and prints one JSON object: AJI/Dice/PQ before and after on the evaluation tiles, training samples/s
and the commands. ``--both-ways`` swaps the two pairs and repeats. Threads: set OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HELD_OUT = ["TCGA-21-5786-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1"]


def write_tile_as_slide(data: Path, name: str, work: Path) -> tuple[Path, Path]:
    """``work/NAME.tif`` (the tile as a slide, um/px in its tags) and ``work/NAME.geojson`` (its outlines)."""
    import tifffile

    from nuclick_wsi.io.annotations import read_imagescope_polygons, write_qupath
    from nuclick_wsi.io.datasets import read_rgb
    from nuclick_wsi.records import Instance

    polys, mpp = read_imagescope_polygons(data / "annotations" / f"{name}.xml")
    slide, outlines = work / f"{name}.tif", work / f"{name}.geojson"
    res = 1e4 / mpp  # pixels per centimetre
    tifffile.imwrite(slide, read_rgb(data / "images" / f"{name}.tif"), tile=(256, 256), compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER")
    write_qupath([Instance(label=k, uuid=f"gt-{k}", geometry=p, class_name="Corrected")
                  for k, p in enumerate(polys, 1)], outlines)
    return slide, outlines


def run(cmd: list[str], log: Path) -> float:
    """Run a command (output to ``log``); return its wall time."""
    t0 = time.time()
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.time() - t0


def score(data: Path, tiles: list[str], weights: str, out: Path) -> tuple[dict, list[str]]:
    cmd = ["nuclick-wsi", "evaluate", str(data), "--tiles", ",".join(tiles), "--weights", weights,
           "--no-baselines", "--json", str(out)]
    run(cmd, out.with_suffix(".log"))
    overall = json.loads(out.read_text())["overall"]["model"]
    return {k: overall[k] for k in ("aji", "dice", "pq")}, cmd


def one_way(args, train_on: list[str], test_on: list[str], tag: str) -> dict:
    work = args.work
    cmd = ["nuclick-wsi", "train", "-q", "--init", args.weights, "--val", "none", "--lr", str(args.lr),
           "--epochs", str(args.epochs), "--max-minutes", str(args.minutes), "-o", str(work / f"tuned-{tag}.pt")]
    for name in train_on:
        cmd += ["--slide", str(work / f"{name}.tif"), "--annotations", str(work / f"{name}.geojson")]
    for stale in (work / f"tuned-{tag}.pt", work / f"tuned-{tag}.last.pt"):
        stale.unlink(missing_ok=True)
    wall = run(cmd, work / f"train-{tag}.log")
    import torch

    meta = torch.load(work / f"tuned-{tag}.pt", map_location="cpu", weights_only=False)["metadata"]["training"]
    hist = meta["history"]
    bs = meta["config"]["batch_size"]
    samples = len(hist) * max((meta["config"]["samples_per_epoch"] or meta["train_objects"]) // bs, 1) * bs
    before, _ = score(args.data, test_on, args.weights, work / f"before-{tag}.json")
    after, eval_cmd = score(args.data, test_on, str(work / f"tuned-{tag}.pt"), work / f"after-{tag}.json")
    return {"train_on": train_on, "test_on": test_on, "before": before, "after": after,
            "gain": {k: round(after[k] - before[k], 4) for k in after},
            "epochs": len(hist), "train_objects": meta["train_objects"],
            "train_loss_first_last": [round(hist[0]["train_loss"], 4), round(hist[-1]["train_loss"], 4)],
            "train_s": round(hist[-1]["elapsed_s"], 1), "samples_per_s": round(samples / hist[-1]["elapsed_s"], 1),
            "wall_s": round(wall, 1), "train_command": " ".join(cmd), "evaluate_command": " ".join(eval_cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="A model trained without the held-out tiles.")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/monuseg-train"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--epochs", type=int, default=100, help="Upper bound; --minutes ends the run first.")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--both-ways", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT:
        write_tile_as_slide(args.data, name, args.work)
    a, b = HELD_OUT[:2], HELD_OUT[2:]
    results = [one_way(args, a, b, "ab")]
    if args.both_ways:
        results.append(one_way(args, b, a, "ba"))
    import torch

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    out = {"weights": args.weights, "commit": head, "threads": os.environ.get("OMP_NUM_THREADS"), "nproc": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0],
           "results": results}
    print(json.dumps(out, indent=1))
    (args.work / "corrections.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
