"""``evaluate``: the NuClick paper's protocol on tiles with ground-truth outlines.

One click per ground-truth nucleus (its centroid, or its innermost pixel when the centroid falls
outside it), every other click as exclusion; optional Gaussian jitter of the clicks (kept inside
their nucleus). Scores AJI, Dice, DQ, SQ, PQ and mean object Hausdorff per tile and overall (the
mean over tiles), for the model and for two click-seeded baselines (a disk at the click; watershed
on the haematoxylin channel), so users see what the model adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
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


#: true-area bins (um^2) for the predicted/true area ratio: 100, 200, 400 px at 0.25 um/px (40x)
AREA_BINS_UM2 = (6.25, 12.5, 25.0)


@dataclass
class TileScores:
    name: str
    n_objects: int
    scores: dict[str, dict[str, float]]  #: method -> metric -> value
    seconds: float
    #: per ground-truth object: true area um^2, predicted area um^2 of its click's instance, IoU, confidence
    objects: np.ndarray | None = None


def rescale_tile(tile: Tile, factor: float) -> Tile:
    """The tile as a scanner at ``factor`` times its resolution would give it (0.5: 40x -> 20x).

    The image is resampled with antialiasing, the labels by nearest neighbour; um/px grows by 1/factor.
    """
    from skimage.transform import resize

    h, w = tile.labels.shape
    shape = (max(int(round(h * factor)), 1), max(int(round(w * factor)), 1))
    img = resize(tile.image, shape, order=1, anti_aliasing=factor < 1, preserve_range=True).round().astype(np.uint8)
    lab = resize(tile.labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(tile.labels.dtype)
    ids = np.unique(lab)
    return replace(tile, image=img, labels=lab, targets=ids[ids > 0], mpp=tile.mpp / factor if tile.mpp else None)


def object_table(gt: np.ndarray, pred: np.ndarray, ids: np.ndarray, instances, mpp: float) -> np.ndarray:
    """(n, 4): true area, predicted area (um^2), IoU and confidence of click k's instance vs object ids[k]."""
    n = len(ids)
    conf = np.full(n, np.nan)
    for inst in instances:
        if inst.prompt_index < n and getattr(inst, "confidence", None) is not None:
            conf[inst.prompt_index] = inst.confidence
    true_area = np.bincount(gt.ravel(), minlength=int(gt.max()) + 1)[ids]
    labels = np.arange(1, n + 1)
    pred_area = np.bincount(pred.ravel(), minlength=n + 1)[labels]
    both = gt.astype(np.int64) * (n + 1) + pred.astype(np.int64)
    inter_pairs = np.bincount(both.ravel(), minlength=(int(gt.max()) + 1) * (n + 1))
    inter = inter_pairs[ids.astype(np.int64) * (n + 1) + labels]
    iou = inter / np.maximum(true_area + pred_area - inter, 1)
    return np.stack([true_area * mpp ** 2, pred_area * mpp ** 2, iou, conf], 1)


def size_calibration(objects: np.ndarray) -> dict[str, Any]:
    """Median predicted/true area per true-size bin (the issue's size bias), over all tiles' objects."""
    edges = (0.0, *AREA_BINS_UM2, np.inf)
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (objects[:, 0] >= lo) & (objects[:, 0] < hi)
        name = f"{lo:g}-{hi:g} um2" if np.isfinite(hi) else f">= {lo:g} um2"
        ratio = objects[sel, 1] / np.maximum(objects[sel, 0], 1e-9)
        out[name] = {"n": int(sel.sum()), "median_area_ratio": round(float(np.median(ratio)), 3) if sel.any() else None}
    return out


def confidence_ranking(objects: np.ndarray) -> dict[str, Any] | None:
    """How well the outline confidence ranks outlines by IoU: Spearman rho, IoU of the worst 5% vs the rest."""
    from scipy.stats import spearmanr

    ok = np.isfinite(objects[:, 3]) & (objects[:, 1] > 0)
    if ok.sum() < 20:
        return None
    conf, iou = objects[ok, 3], objects[ok, 2]
    worst = conf <= np.quantile(conf, 0.05)
    return {"n": int(ok.sum()), "spearman_rho": round(float(spearmanr(conf, iou).statistic), 4),
            "iou_worst_5pct": round(float(iou[worst].mean()), 4), "iou_rest": round(float(iou[~worst].mean()), 4)}


def evaluate_tile(tile: Tile, model: LoadedModel, *, mpp: float, jitter: float = 0.0, seed: int = 0,
                  baselines: bool = True, options: SegmentOptions | None = None, predictor=None) -> TileScores:
    """Score the model (and the baselines) on one tile."""
    gt = tile.labels
    xs, ys = gt_clicks(gt, jitter=jitter, rng=np.random.default_rng(seed))
    prompts = Prompts(clicks=[Click(x=x + 0.5, y=y + 0.5, index=k, source=f"object {k}") for k, (x, y) in enumerate(zip(xs, ys))])
    source = array_source(tile.image, mpp, name=tile.name)
    opts = options or SegmentOptions(progress=False, duplicate_px=0)
    t = time.perf_counter()
    pred, instances, _ = predict_labels(source, prompts, model, predictor=predictor, options=opts, mpp=mpp)
    secs = time.perf_counter() - t
    scores = {"model": score_all(gt, pred.astype(np.int64))}
    ids = np.unique(gt)
    objects = object_table(gt, np.asarray(pred), ids[ids > 0], instances, mpp)
    if baselines:
        clicks = list(zip(xs.tolist(), ys.tolist()))
        scores["disk"] = score_all(gt, disk_baseline(gt.shape, clicks))
        scores["watershed"] = score_all(gt, watershed_baseline(tile.image, clicks))
    return TileScores(tile.name, len(xs), scores, secs, objects)


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
             baselines: bool = True, options: SegmentOptions | None = None, progress: bool = False,
             scale: float = 1.0) -> dict[str, Any]:
    """Evaluate on tiles; returns per-tile and overall (mean over tiles) scores as a JSON-able dict.

    ``scale`` resamples each tile first (0.5: the tiles as a 20x scan of a 40x tile would give them).
    """
    from nuclick_wsi.model.predictor import Predictor

    opts = options or SegmentOptions(progress=False, duplicate_px=0)
    predictor = Predictor(model, opts.device, opts.precision, opts.tta, opts.runtime)
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
        if scale != 1.0:
            tile, tile_mpp = rescale_tile(tile, scale), tile_mpp / scale
        per_tile.append(evaluate_tile(tile, model, mpp=tile_mpp, jitter=jitter, seed=seed, baselines=baselines,
                                      options=opts, predictor=predictor))
    methods = list(per_tile[0].scores) if per_tile else []
    overall = {m: {k: float(np.nanmean([t.scores[m][k] for t in per_tile])) for k in METRICS} for m in methods}
    n = sum(t.n_objects for t in per_tile)
    secs = sum(t.seconds for t in per_tile)
    objects = np.concatenate([t.objects for t in per_tile]) if per_tile else np.zeros((0, 4))
    return {
        "model": model.source, "jitter": jitter, "seed": seed, "notes": notes,
        "tiles": [{"name": t.name, "objects": t.n_objects, "seconds": round(t.seconds, 2),
                   **{m: {k: round(float(v), 4) for k, v in t.scores[m].items() if k in METRICS} for m in t.scores}}
                  for t in per_tile],
        "overall": {m: {k: round(v, 4) for k, v in d.items()} for m, d in overall.items()},
        "objects": n, "nuclei_per_s": round(n / secs, 1) if secs else None, "scale": scale,
        "size_calibration": size_calibration(objects) if len(objects) else {},
        "confidence_ranking": confidence_ranking(objects) if len(objects) else None,
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
    cal = result.get("size_calibration") or {}
    if cal:
        lines.append("predicted/true area (median) by true size: " + ", ".join(
            f"{name}: {v['median_area_ratio']} (n={v['n']})" for name, v in cal.items()))
    rank = result.get("confidence_ranking")
    if rank:
        lines.append(f"outline confidence vs IoU: Spearman rho {rank['spearman_rho']}, IoU of the least confident 5% "
                     f"{rank['iou_worst_5pct']} vs {rank['iou_rest']} for the rest")
    return "\n".join(lines)
