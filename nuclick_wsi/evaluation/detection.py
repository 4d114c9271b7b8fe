"""Proposals scored on tiles with ground-truth outlines, and proposals fed to NuClick with no human between.

A proposal matches the nucleus it falls inside, one to one (``detection/peaks.py: match_inside``).
Tiles run through the slide path itself (tissue mask, tiles, seams) as in-memory slides; ``scale``
reads them as a scanner at that fraction of their resolution would (0.5: 40x -> 20x).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nuclick_wsi.detection.peaks import f1_counts, match_inside
from nuclick_wsi.detection.slide import DetectOptions, detect_slide
from nuclick_wsi.evaluation.metrics import score_all
from nuclick_wsi.evaluation.protocol import rescale_tile
from nuclick_wsi.io.datasets import Tile
from nuclick_wsi.io.slides.memory import array_source
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.records import Click, Prompts


def tile_proposals(tile: Tile, detector: LoadedModel, mpp: float, options: DetectOptions | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(xy pixels, scores) of the detector on one tile, through the whole-slide path."""
    opts = options or DetectOptions(progress=False)
    source = array_source(tile.image, mpp, name=tile.name)
    found = detect_slide(source, detector, mpp, options=opts)
    return found.xy, found.scores


def _prepared(tiles: list[Tile], scale: float, default_mpp: float) -> list[tuple[Tile, float]]:
    out = []
    for tile in tiles:
        mpp = tile.mpp or default_mpp
        if scale != 1.0:
            tile, mpp = rescale_tile(tile, scale), mpp / scale
        out.append((tile, mpp))
    return out


def evaluate_proposals(tiles: list[Tile], detector: LoadedModel, *, scale: float = 1.0, default_mpp: float = 0.25,
                       options: DetectOptions | None = None) -> dict[str, Any]:
    """Precision, recall and F1 per tile, summed over tiles ("overall") and their mean ("mean_f1")."""
    per, tp, n_pred, n_true = [], 0, 0, 0
    for tile, mpp in _prepared(tiles, scale, default_mpp):
        xy, _ = tile_proposals(tile, detector, mpp, options)
        m = match_inside(xy, tile.labels)
        per.append({"name": tile.name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}})
        tp, n_pred, n_true = tp + m["tp"], n_pred + m["tp"] + m["fp"], n_true + m["tp"] + m["fn"]
    overall = f1_counts(tp, n_pred, n_true)
    return {"scale": scale, "tiles": per, "overall": {k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in overall.items()},
            "mean_f1": round(float(np.mean([t["f1"] for t in per])), 4) if per else None}


def propose_then_segment(tiles: list[Tile], detector: LoadedModel, model: LoadedModel, *, scale: float = 1.0,
                         default_mpp: float = 0.25, options: DetectOptions | None = None) -> dict[str, Any]:
    """AJI, Dice, PQ... of NuClick's outlines from the proposals alone (no human correction), per tile and mean."""
    from nuclick_wsi.model.predictor import Predictor
    from nuclick_wsi.pipeline import SegmentOptions, predict_labels

    seg_opts = SegmentOptions(progress=False, duplicate_px=0)
    predictor = Predictor(model, seg_opts.device, seg_opts.precision)
    per = []
    for tile, mpp in _prepared(tiles, scale, default_mpp):
        xy, _ = tile_proposals(tile, detector, mpp, options)
        prompts = Prompts(clicks=[Click(x=float(x), y=float(y), index=k, source=f"proposal {k}")
                                  for k, (x, y) in enumerate(xy)])
        pred, _, _ = predict_labels(array_source(tile.image, mpp, name=tile.name), prompts, model,
                                    predictor=predictor, options=seg_opts, mpp=mpp)
        scores = score_all(tile.labels, np.asarray(pred).astype(np.int64))
        per.append({"name": tile.name, "proposals": len(xy),
                    **{k: round(float(scores[k]), 4) for k in ("aji", "dice", "pq")}})
    mean = {k: round(float(np.mean([t[k] for t in per])), 4) for k in ("aji", "dice", "pq")} if per else {}
    return {"scale": scale, "tiles": per, "mean": mean}
