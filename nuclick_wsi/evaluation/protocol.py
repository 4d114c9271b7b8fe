"""``evaluate``: the NuClick paper's protocol on tiles with ground-truth outlines.

One click per ground-truth nucleus (its centroid, or its innermost pixel when the centroid falls
outside it), every other click as exclusion; optional Gaussian jitter of the clicks (kept inside
their nucleus). Scores AJI, Dice, DQ, SQ, PQ and mean object Hausdorff per tile and overall (the
mean over tiles), for the model and for two click-seeded baselines (a disk at the click; watershed
on the haematoxylin channel), so users see what the model adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from nuclick_wsi.evaluation.baselines import disk_baseline, watershed_baseline
from nuclick_wsi.evaluation.metrics import score_all
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.pipeline import SegmentOptions, predict_labels
from nuclick_wsi.records import Click, Prompts
from nuclick_wsi.io.slides.memory import array_source
from nuclick_wsi.io.datasets import Tile, find_pairs, load_tile

METRICS = ("aji", "dice", "dq", "sq", "pq", "hausdorff")


def gt_clicks(labels: np.ndarray, *, jitter: float = 0.0, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One click (x, y pixel indices) per ground-truth object and the object ids, in id order.

    The click is the centroid's pixel, or the innermost pixel (largest distance to the edge) when the
    centroid falls outside the object; with ``jitter`` > 0 it moves by N(0, jitter) px, redrawn (up
    to 20 times, else left at the centroid) until it lands inside its object.
    """
    rng = rng or np.random.default_rng(0)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    slices = ndi.find_objects(labels)
    xs, ys = [], []
    for i in ids:
        sl = slices[i - 1]
        m = labels[sl] == i
        cy, cx = ndi.center_of_mass(m)
        r, c = int(cy), int(cx)
        if not m[r, c]:
            d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(int(np.argmax(d)), d.shape)
        if jitter > 0:
            for _ in range(20):
                rr = int(np.floor(cy + rng.normal(0, jitter) + 0.5))
                cc = int(np.floor(cx + rng.normal(0, jitter) + 0.5))
                if 0 <= rr < m.shape[0] and 0 <= cc < m.shape[1] and m[rr, cc]:
                    r, c = rr, cc
                    break
        ys.append(sl[0].start + r)
        xs.append(sl[1].start + c)
    return np.asarray(xs, int), np.asarray(ys, int)


@dataclass
class TileScores:
    name: str
    n_objects: int
    scores: dict[str, dict[str, float]]  #: method -> metric -> value
    seconds: float


def evaluate_tile(tile: Tile, model: LoadedModel, *, mpp: float, jitter: float = 0.0, seed: int = 0,
                  baselines: bool = True, options: SegmentOptions | None = None, predictor=None) -> TileScores:
    """Score the model (and the baselines) on one tile."""
    gt = tile.labels
    xs, ys = gt_clicks(gt, jitter=jitter, rng=np.random.default_rng(seed))
    prompts = Prompts(clicks=[Click(x=x + 0.5, y=y + 0.5, index=k, source=f"object {k}") for k, (x, y) in enumerate(zip(xs, ys))])
    source = array_source(tile.image, mpp, name=tile.name)
    opts = options or SegmentOptions(progress=False, duplicate_px=0)
    t = time.perf_counter()
    pred, _, _ = predict_labels(source, prompts, model, predictor=predictor, options=opts, mpp=mpp)
    secs = time.perf_counter() - t
    scores = {"model": score_all(gt, pred.astype(np.int64))}
    if baselines:
        clicks = list(zip(xs.tolist(), ys.tolist()))
        scores["disk"] = score_all(gt, disk_baseline(gt.shape, clicks))
        scores["watershed"] = score_all(gt, watershed_baseline(tile.image, clicks))
    return TileScores(tile.name, len(xs), scores, secs)


def load_eval_tiles(data: list[str], names: list[str] | None = None) -> list[Tile]:
    """Tiles with instance outlines (binary masks cannot be scored per instance)."""
    tiles = []
    for folder in data:
        for img, ann, kind in find_pairs(folder):
            if kind != "instances" or (names and img.stem not in names):
                continue
            tiles.append(load_tile(img, ann))
    return tiles


def evaluate(tiles: list[Tile], model: LoadedModel, *, mpp: float | None = None, jitter: float = 0.0, seed: int = 0,
             baselines: bool = True, options: SegmentOptions | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate on tiles; returns per-tile and overall (mean over tiles) scores as a JSON-able dict."""
    from nuclick_wsi.model.predictor import Predictor

    opts = options or SegmentOptions(progress=False, duplicate_px=0)
    predictor = Predictor(model, opts.device, opts.precision)
    per_tile, notes = [], []
    it = tiles
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(tiles, desc="evaluate", unit="tile")
    for tile in it:
        tile_mpp = mpp or tile.mpp
        if tile_mpp is None:
            tile_mpp = model.mpp
            notes.append(f"{tile.name}: um/px unknown, assumed the model's {model.mpp}")
        per_tile.append(evaluate_tile(tile, model, mpp=tile_mpp, jitter=jitter, seed=seed, baselines=baselines,
                                      options=opts, predictor=predictor))
    methods = list(per_tile[0].scores) if per_tile else []
    overall = {m: {k: float(np.nanmean([t.scores[m][k] for t in per_tile])) for k in METRICS} for m in methods}
    n = sum(t.n_objects for t in per_tile)
    secs = sum(t.seconds for t in per_tile)
    return {
        "model": model.source, "jitter": jitter, "seed": seed, "notes": notes,
        "tiles": [{"name": t.name, "objects": t.n_objects, "seconds": round(t.seconds, 2),
                   **{m: {k: round(float(v), 4) for k, v in t.scores[m].items() if k in METRICS} for m in t.scores}}
                  for t in per_tile],
        "overall": {m: {k: round(v, 4) for k, v in d.items()} for m, d in overall.items()},
        "objects": n, "nuclei_per_s": round(n / secs, 1) if secs else None,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the evaluation (one row per tile and method, then the means)."""
    head = f"{'tile':<26}{'method':<11}" + "".join(f"{k:>10}" for k in METRICS)
    lines = [head, "-" * len(head)]
    for t in result["tiles"]:
        for m in result["overall"]:
            lines.append(f"{t['name'][:25]:<26}{m:<11}" + "".join(f"{t[m][k]:>10.4f}" for k in METRICS))
    lines.append("-" * len(head))
    for m, d in result["overall"].items():
        lines.append(f"{'mean over tiles':<26}{m:<11}" + "".join(f"{d[k]:>10.4f}" for k in METRICS))
    return "\n".join(lines)
