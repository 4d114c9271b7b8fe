"""The review list: outlines worth a second look, as QuPath annotations (``S.review.geojson``).

Each doubtful outline (and each click that gave none) becomes an annotation of class
"NuClick review" whose name says why, so the user walks the list in QuPath's Annotations tab.
Reasons (each can be switched off or tuned in :class:`ReviewOptions`):

- low confidence: among the ``low_fraction`` least confident outlines of the run, or (with the
  outline confidence of :mod:`nuclick_wsi.postprocess.confidence`, a soft IoU with the probability
  map around the outline) below ``low_value``. Runs without it (older reports) rank by the mean
  score instead, with the rank rule only;
- area far from its class's median: outside [median / ``area_factor``, median * ``area_factor``];
- clipped at the patch border: the outline touches the edge of the model's patch around its click;
- click on the outline's edge: the click lies within ``edge_px`` model pixels of the boundary;
- merged into a neighbour's territory: at least ``shared_fraction`` of its outline borders other
  outlines (where two outlines claim the same pixels, the stitcher gives them to one of them);
- no outline: the click was skipped (nothing segmented, duplicate, ...), as a point.
"""

from __future__ import annotations

import json
import math
import uuid as _uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from shapely.geometry import Point, mapping

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.store.labels import open_labels, stored_chunks
from nuclick_wsi.qc.data import Outline, QcInputs

REVIEW_CLASS = "NuClick review"
REVIEW_COLOR = [255, 0, 255]
REVIEW_MEASUREMENT = "NuClick review"  #: marker measurement (the outline's label id, or 0 for a click)


@dataclass(frozen=True)
class ReviewOptions:
    low_fraction: float = 0.02  #: the least confident share of the run's outlines (at least one)
    #: only for the ``confidence`` measure (the mean score is always >= the threshold): below 1/3 the
    #: probability around the outline weighs at least twice the outline itself (a halo, not a nucleus)
    low_value: float = 1 / 3
    area_factor: float = 3.0
    min_class_size: int = 5  #: classes with fewer outlines are compared with the median of all
    edge_px: float = 1.0
    shared_fraction: float = 0.4


def _low_confidence(inputs: QcInputs, opts: ReviewOptions) -> dict[int, str]:
    vals = np.array([o.value for o in inputs.outlines], float)
    ok = np.isfinite(vals)
    out: dict[int, str] = {}
    if not ok.any():
        return out
    n_low = math.ceil(opts.low_fraction * ok.sum()) if opts.low_fraction > 0 else 0
    order = np.argsort(np.where(ok, vals, np.inf), kind="stable")[:n_low]
    cut = vals[order[-1]] if n_low else -np.inf
    for k, o in enumerate(inputs.outlines):
        if not ok[k]:
            continue
        if inputs.measure == "confidence" and o.value < opts.low_value:
            out[o.label] = f"low confidence ({o.value:.3f} < {opts.low_value:.3g})"
        elif n_low and o.value <= cut:
            out[o.label] = (f"low {inputs.measure} ({o.value:.3f}, lowest {opts.low_fraction:.0%})")
    return out


def _area_outliers(inputs: QcInputs, opts: ReviewOptions) -> dict[int, str]:
    by_class: dict[str, list[float]] = defaultdict(list)
    for o in inputs.outlines:
        by_class[o.class_name].append(o.area_px)
    overall = float(np.median([o.area_px for o in inputs.outlines])) if inputs.outlines else 0.0
    medians = {name: float(np.median(areas)) if len(areas) >= opts.min_class_size else overall
               for name, areas in by_class.items()}  # once per class, not per outline
    out: dict[int, str] = {}
    for o in inputs.outlines:
        med = medians[o.class_name]
        if med <= 0 or len(inputs.outlines) < opts.min_class_size:
            continue
        ratio = o.area_px / med
        if ratio > opts.area_factor or ratio < 1 / opts.area_factor:
            out[o.label] = f"area far from its class's median ({ratio:.2g}x)"
    return out


def _patch_box(o: Outline, patch: int, scale: float) -> tuple[float, float, float, float]:
    """Level-0 extent of the grid the click's probabilities were cut from (as pipeline.piece)."""
    half = patch // 2
    px0 = (math.floor(o.x / scale) - half) * scale
    py0 = (math.floor(o.y / scale) - half) * scale
    size = patch * scale
    if scale == 1.0:
        return round(px0), round(py0), round(px0) + patch, round(py0) + patch
    return math.floor(px0), math.floor(py0), math.ceil(px0 + size), math.ceil(py0 + size)


def _clipped(inputs: QcInputs) -> dict[int, str]:
    model, mpp = inputs.report.get("model") or {}, inputs.report.get("mpp") or {}
    patch, scale = model.get("patch_size"), float(mpp.get("level0_px_per_model_px") or 1.0)
    if not patch:
        return {}
    out = {}
    for o in inputs.outlines:
        x0, y0, x1, y1 = _patch_box(o, int(patch), scale)
        bx0, by0, bx1, by1 = o.geometry.bounds
        if bx0 <= x0 or by0 <= y0 or bx1 >= x1 or by1 >= y1:
            out[o.label] = f"clipped at the patch border ({patch} model px)"
    return out


def _click_on_edge(inputs: QcInputs, opts: ReviewOptions) -> dict[int, str]:
    scale = float((inputs.report.get("mpp") or {}).get("level0_px_per_model_px") or 1.0)
    limit = opts.edge_px * scale
    out = {}
    for o in inputs.outlines:
        d = o.geometry.boundary.distance(Point(o.x, o.y))
        if d < limit:
            out[o.label] = f"click on the outline's edge ({d:.1f} px from it)"
    return out


def shared_edges(labels_path) -> tuple[dict[int, int], dict[int, int]]:
    """Per label: pixel edges on its outline, and those bordering another label.

    Level 0 is read chunk by chunk, each chunk once (its outer rows and columns are kept for the
    edges across chunk borders), so memory stays at one chunk whatever the slide's size.
    """
    arr = open_labels(labels_path)
    h, w = arr.shape
    step = arr.chunks[0]
    perim: dict[int, int] = defaultdict(int)
    shared: dict[int, int] = defaultdict(int)

    def add(a: np.ndarray, b: np.ndarray) -> None:
        diff = a != b
        for lab, other in ((a, b), (b, a)):
            on = diff & (lab > 0)
            for counts, ids in ((perim, lab[on]), (shared, lab[on & (other > 0)])):
                u, n = np.unique(ids, return_counts=True)
                for i, c in zip(u.tolist(), n.tolist()):
                    counts[i] += c

    stored = stored_chunks(labels_path, 0)
    rims: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}  # top row, left column, bottom row, right column
    for cy, cx in sorted(stored):
        y0, x0 = cy * step, cx * step
        block = np.asarray(arr[y0:min(h, y0 + step), x0:min(w, x0 + step)])
        add(block[:, :-1], block[:, 1:])
        add(block[:-1, :], block[1:, :])
        rims[(cy, cx)] = (block[0].copy(), block[:, 0].copy(), block[-1].copy(), block[:, -1].copy())

    def rim(cy: int, cx: int, side: int) -> np.ndarray:
        if (cy, cx) in rims:
            return rims[(cy, cx)][side]
        size = min(step, w - cx * step) if side in (0, 2) else min(step, h - cy * step)
        return np.zeros(size, np.uint32)

    borders = set()  # (upper or left chunk, lower or right chunk, vertical?) next to a stored chunk
    for cy, cx in stored:
        for a, b, down in (((cy - 1, cx), (cy, cx), True), ((cy, cx), (cy + 1, cx), True),
                           ((cy, cx - 1), (cy, cx), False), ((cy, cx), (cy, cx + 1), False)):
            if min(a) >= 0 and b[0] * step < h and b[1] * step < w:
                borders.add((a, b, down))
    for a, b, down in sorted(borders):
        if down:
            add(rim(*a, 2)[None, :], rim(*b, 0)[None, :])
        else:
            add(rim(*a, 3)[:, None], rim(*b, 1)[:, None])
    return dict(perim), dict(shared)


def _merged(inputs: QcInputs, opts: ReviewOptions) -> dict[int, str]:
    perim, shared = shared_edges(inputs.labels_path)
    out = {}
    for o in inputs.outlines:
        p, s = perim.get(o.label, 0), shared.get(o.label, 0)
        if p and s / p >= opts.shared_fraction:
            out[o.label] = f"merged into a neighbour's territory (shares {s / p:.0%} of its outline)"
    return out


def review(inputs: QcInputs, options: ReviewOptions | None = None) -> dict[int, list[str]]:
    """Per outline label, the reasons to look at it again (labels without reasons are left out)."""
    opts = options or ReviewOptions()
    reasons: dict[int, list[str]] = defaultdict(list)
    for found in (_low_confidence(inputs, opts), _area_outliers(inputs, opts), _clipped(inputs),
                  _click_on_edge(inputs, opts), _merged(inputs, opts)):
        for label, why in found.items():
            reasons[label].append(why)
    return dict(sorted(reasons.items()))


def _feature(fid: str, geometry, name: str, marker: int) -> dict:
    return {"type": "Feature", "id": fid, "geometry": geometry,
            "properties": {"objectType": "annotation", "name": name, "isLocked": False,
                           "classification": {"name": REVIEW_CLASS, "color": REVIEW_COLOR},
                           "measurements": {REVIEW_MEASUREMENT: marker}}}


def review_features(inputs: QcInputs, reasons: dict[int, list[str]]) -> list[dict]:
    """QuPath annotation Features: flagged outlines (their outline) and skipped clicks (a point)."""
    by_label = {o.label: o for o in inputs.outlines}
    feats = []
    for label, why in reasons.items():
        o = by_label[label]
        fid = str(_uuid.uuid5(_uuid.NAMESPACE_URL, f"nuclick-review/{o.uuid}"))
        name = f"#{label} {o.class_name}: {'; '.join(why)}"
        feats.append(_feature(fid, mapping(o.geometry), name, label))
    width, height = inputs.report["slide"]["width"], inputs.report["slide"]["height"]
    for c in inputs.skipped:
        x, y = c.get("x"), c.get("y")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) or not (
                0 <= x < width and 0 <= y < height):
            continue  # outside the slide: nothing to show there
        fid = str(_uuid.uuid5(_uuid.NAMESPACE_URL, f"nuclick-review/{inputs.stem}/click/{c['index']}/{x}/{y}"))
        feats.append(_feature(fid, {"type": "Point", "coordinates": [x, y]},
                              f"click {c['index']}: no outline: {c.get('reason', '')}", 0))
    return feats


def write_review(path, features: list[dict]) -> None:
    """Write the review Features as a QuPath GeoJSON FeatureCollection (atomically)."""
    text = '{"type":"FeatureCollection","features":[' + ",".join(
        "\n" + json.dumps(f, separators=(",", ":"), ensure_ascii=False) for f in features) + "\n]}\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
