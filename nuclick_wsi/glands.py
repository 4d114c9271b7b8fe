"""Glands from squiggles: patch geometry, guidance maps and the segmentation run.

A squiggle is a polyline drawn inside one large object (a gland); NuClick's second guidance
(Koohbanani et al., 2020). Each squiggle gets one patch of ``patch`` x ``patch`` model pixels
(512 for glands):

- **box**: the squiggle's bounding box at the model's um/px, widened on every side by ``context``
  times its longer side (at least :data:`MIN_CONTEXT` model pixels), made square about its centre.
  The squiggle lies *inside* the gland, so the gland's edge lies outside the squiggle's own box;
  ``context=0`` is the paper's rule to the letter.
- **smaller than the patch**: the box is grown to ``patch`` x ``patch`` about the same centre and
  read at the model's resolution (no resampling beyond the model's um/px).
- **larger**: the box is read at its size and downscaled to ``patch`` x ``patch``; the probability
  is scaled back up onto level-0 pixels (bilinear) before thresholding, which is how the mask is
  scaled back.

Inclusion map: the squiggle rasterised on the patch grid (a line between consecutive vertices).
Exclusion map: one pixel of each *other* squiggle that enters the patch: the middle one, along the
line, of its pixels inside the patch. Clicks (nuclei) are not exclusion for glands.

Post-processing: the gland model's thresholds (NuClick authors: 0.3, 1000, 1000 model pixels) at
the model's um/px, i.e. scaled by the level-0 pixel area, the components of the thresholded map
that the squiggle touches (morphological reconstruction from the squiggle), holes at least
``min_hole_px`` kept (a lumen stays a hole, an interior ring in the polygon and 0 in the labels).

Frames: as :mod:`nuclick_wsi.guidance`. The model-pixel grid is anchored at the level-0 origin;
``scale`` is level-0 pixels per model pixel. A :class:`GlandBox` of ``side`` model pixels at model
pixel ``(ox, oy)`` covers level-0 ``[ox * scale, (ox + side) * scale)`` (and likewise in y); patch
pixel ``(i, j)`` is centred on level-0 point ``(x0 + (j + 0.5) * step, y0 + (i + 0.5) * step)``
with ``step = side * scale / patch``.

Label ids: squiggle ``k`` of a file with ``n`` clicks gets id ``n + k + 1`` (clicks keep
``index + 1``), one id space across the nucleus and gland label arrays, the GeoJSON and the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import draw

from .engine import Predictor, Timer, background
from .errors import ModelError, NuclickError
from .export import deterministic_uuid, trace_mask
from .guidance import effective_scale
from .models.weights import LoadedModel, load_model
from .postprocess import PostParams, instance_from_probability
from .records import Instance, Prompts, Squiggle, outcome
from .slide import SlideSource
from .stitch import Piece, Stitcher

#: context around the squiggle's bounding box, as a fraction of its longer side (each side)
CONTEXT = 0.25
#: the least context, model pixels
MIN_CONTEXT = 16
#: gland patches per inference batch (512 x 512 x 5 float32 = 5 MB each)
BATCH = 8

TRAIN_HINT = ("no gland model ships with nuclick-wsi: train one on GlaS-style data with "
              "`nuclick-wsi train GLAS_FOLDER --task gland --mpp 0.62 -o gland.pt` "
              "(README, 'Glands: squiggles')")


# ------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class GlandBox:
    """The square of slide a squiggle's patch covers (model-pixel grid anchored at level-0 origin)."""

    ox: int  #: model-pixel origin
    oy: int
    side: int  #: model pixels (>= patch)
    patch: int  #: network input side
    scale: float  #: level-0 px per model px

    @property
    def x0(self) -> float:
        """Level-0 x of the box's left edge."""
        return self.ox * self.scale

    @property
    def y0(self) -> float:
        return self.oy * self.scale

    @property
    def size(self) -> float:
        """Level-0 side of the box."""
        return self.side * self.scale

    @property
    def step(self) -> float:
        """Level-0 pixels per patch pixel."""
        return self.size / self.patch

    @property
    def downscale(self) -> float:
        """Model pixels per patch pixel: 1 when grown to the patch, > 1 when downscaled."""
        return self.side / self.patch

    def to_patch(self, xy: np.ndarray) -> np.ndarray:
        """Level-0 points (n, 2) -> continuous patch coordinates (pixel j covers [j, j + 1))."""
        return (np.asarray(xy, float) - [self.x0, self.y0]) / self.step


def square_box(xmin: float, ymin: float, xmax: float, ymax: float, patch: int, *, context: float = CONTEXT,
               min_context: float = MIN_CONTEXT) -> tuple[int, int, int]:
    """The square patch box (ox, oy, side), in model pixels, around a bounding box in model pixels.

    The box is widened by ``max(context * L, min_context)`` on every side (``L`` its longer side),
    made square about its centre and grown to ``patch`` when smaller. Training and inference share
    this rule.
    """
    longer = max(xmax - xmin, ymax - ymin, 0.0)
    side = max(int(math.ceil(longer + 2 * max(context * longer, min_context) - 1e-9)), int(patch))
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    return int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2)), side


def squiggle_box(points: Sequence[tuple[float, float]] | np.ndarray, scale: float, patch: int, *,
                 context: float = CONTEXT, min_context: float = MIN_CONTEXT) -> GlandBox:
    """The patch box of a squiggle given in level-0 points (see the module notes)."""
    pts = np.asarray(points, float).reshape(-1, 2) / scale
    ox, oy, side = square_box(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max(), patch,
                              context=context, min_context=min_context)
    return GlandBox(ox, oy, side, int(patch), float(scale))


def polyline_pixels(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (rows, cols) of a polyline in continuous pixel coordinates, in order along the line.

    Vertex (x, y) lies in pixel (floor(y), floor(x)); consecutive vertices are joined by
    Bresenham lines; a pixel repeated right after itself is dropped.
    """
    p = np.floor(np.asarray(xy, float).reshape(-1, 2)).astype(np.int64)
    if len(p) == 1:
        return p[:, 1].copy(), p[:, 0].copy()
    rows, cols = [p[:1, 1]], [p[:1, 0]]
    for (c0, r0), (c1, r1) in zip(p[:-1], p[1:]):
        rr, cc = draw.line(int(r0), int(c0), int(r1), int(c1))
        rows.append(rr[1:])
        cols.append(cc[1:])
    r, c = np.concatenate(rows), np.concatenate(cols)
    keep = np.ones(len(r), bool)
    keep[1:] = (np.diff(r) != 0) | (np.diff(c) != 0)
    return r[keep], c[keep]


def guidance_maps(points: np.ndarray, others: Sequence[np.ndarray], box: GlandBox) -> tuple[np.ndarray, np.ndarray]:
    """Inclusion and exclusion maps (float32, patch x patch) of a squiggle in its box.

    Parameters
    ----------
    points : (n, 2) level-0 vertices of the squiggle
    others : level-0 vertex arrays of the other squiggles (those that miss the box add nothing)
    box : GlandBox
    """
    p = box.patch
    incl = np.zeros((p, p), np.float32)
    excl = np.zeros((p, p), np.float32)
    rr, cc = polyline_pixels(box.to_patch(points))
    ok = (rr >= 0) & (rr < p) & (cc >= 0) & (cc < p)
    incl[rr[ok], cc[ok]] = 1.0
    x0, y0, x1, y1 = box.x0, box.y0, box.x0 + box.size, box.y0 + box.size
    for other in others:
        o = np.asarray(other, float).reshape(-1, 2)
        if not _meets(o, x0, y0, x1, y1):
            continue
        rr, cc = polyline_pixels(box.to_patch(o))
        ok = (rr >= 0) & (rr < p) & (cc >= 0) & (cc < p)
        if not ok.any():
            continue
        idx = np.flatnonzero(ok)
        r, c = rr[idx[len(idx) // 2]], cc[idx[len(idx) // 2]]
        if not incl[r, c]:
            excl[r, c] = 1.0
    return incl, excl


def _meets(o: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> bool:
    """Whether the bounding box of a polyline meets a box (a line may cross it with no vertex inside)."""
    return not (o[:, 0].max() < x0 or o[:, 0].min() >= x1 or o[:, 1].max() < y0 or o[:, 1].min() >= y1)


def check_squiggles(prompts: Prompts, slide: SlideSource) -> list[str | None]:
    """Per squiggle: None when it is to be segmented, else the reason it is not."""
    out: list[str | None] = []
    for s in prompts.squiggles:
        pts = np.asarray(s.points, float).reshape(-1, 2)
        if not np.isfinite(pts).all():
            out.append("non-finite coordinates")
        elif not ((pts[:, 0] >= 0) & (pts[:, 0] < slide.width) & (pts[:, 1] >= 0) & (pts[:, 1] < slide.height)).any():
            out.append(f"outside the slide ({slide.width} x {slide.height} px)")
        else:
            out.append(None)
    return out


# ------------------------------------------------------------------------------------------------
# models


def resolve_models(prompts: Prompts, where: str, task: str, *, model: LoadedModel | None = None,
                   weights: str | None = None, gland_model: LoadedModel | None = None,
                   gland_weights: str | None = None) -> tuple[LoadedModel | None, LoadedModel | None]:
    """The (nuclei, gland) models a file's prompts need; None for a kind of prompt it does not hold.

    ``model``/``weights`` are for ``task`` ("nuclei" or "gland"); ``gland_model``/``gland_weights``
    name a gland model explicitly, beside a nucleus model. Clicks use the nucleus model (the
    embedded default unless given), squiggles the gland model (never a default: none ships).

    Raises
    ------
    NuclickError
        No prompts; squiggles without a gland model (says how to train one); ``--task gland``
        without squiggles; a model of the wrong task.
    """
    if task not in ("nuclei", "gland"):
        raise NuclickError(f"unknown task {task!r} (choose nuclei or gland)")
    n_clicks, n_sq = len(prompts.clicks), len(prompts.squiggles)
    if not n_clicks and not n_sq:
        raise NuclickError(f"{where}: no clicks (points) and no squiggles (lines) found")
    if task == "gland":
        if not n_sq:
            raise NuclickError(f"{where}: --task gland but no squiggles (lines) found"
                               f"{f' ({n_clicks} clicks: drop --task gland)' if n_clicks else ''}")
        if (model is not None or weights) and (gland_model is not None or gland_weights):
            raise NuclickError("give the gland model once: --weights with --task gland, or --gland-weights")
        gland_model, gland_weights = gland_model or model, gland_weights or weights
        model, weights = None, None
    nuclei = gland = None
    if not n_clicks and task == "nuclei":
        nuclei = model  # an empty nucleus run; the caller falls back to the default model
    if n_sq:
        if gland_model is None and not gland_weights:
            raise ModelError(f"{where}: {n_sq} squiggle(s) (lines) need a gland model: pass --gland-weights "
                             f"GLAND.pt (or --task gland --weights GLAND.pt); {TRAIN_HINT}")
        gland = gland_model or load_model(gland_weights, task="gland")
        if gland.task != "gland":
            raise ModelError(f"{gland.source}: a {gland.task} model, not a gland model (its metadata task is "
                             f"{gland.task!r}); {TRAIN_HINT}")
    if n_clicks:
        nuclei = model or load_model(weights)
        if nuclei.task == "gland":
            raise ModelError(f"{nuclei.source}: a gland model cannot segment clicks (nuclei); "
                             "pass it with --gland-weights (or --task gland)")
    return nuclei, gland


# ------------------------------------------------------------------------------------------------
# the run


class GlandRun:
    """Segmentation of the squiggles of one slide (the gland half of :func:`nuclick_wsi.pipeline.segment`).

    Parameters
    ----------
    params : PostParams
        Post-processing thresholds in model pixels (the model's, or the user's overrides).
    first_label : int
        Label of squiggle 0 (the number of clicks + 1).
    """

    def __init__(self, slide: SlideSource, prompts: Prompts, model: LoadedModel, predictor: Predictor,
                 params: PostParams, stem: str, mpp: float, *, first_label: int, timer: Timer | None = None,
                 batch_size: int = BATCH, context: float = CONTEXT) -> None:
        self.slide, self.prompts, self.model, self.predictor = slide, prompts, model, predictor
        self.stem, self.mpp, self.first_label = stem, mpp, int(first_label)
        self.scale = effective_scale(model.mpp, mpp)
        self.patch = model.patch_size
        self.model_params = params
        self.params = params.scaled(self.scale ** 2)
        self.timer = timer or Timer()
        self.batch_size = max(1, int(batch_size))
        self.context = context
        self.instances: list[Instance] = []
        self.table: list[dict[str, Any]] = []
        self.reasons: dict[int, str] = {}
        self.boxes: dict[int, GlandBox] = {}
        self._points = [np.asarray(s.points, float).reshape(-1, 2) for s in prompts.squiggles]

    def label_of(self, k: int) -> int:
        return self.first_label + k

    def plan(self) -> list[int]:
        """Valid squiggles in the order their boxes start from the top (the stitcher streams rows)."""
        valid = [k for k in range(len(self.prompts.squiggles)) if k not in self.reasons]
        for k in valid:
            self.boxes[k] = squiggle_box(self._points[k], self.scale, self.patch, context=self.context)
        return sorted(valid, key=lambda k: (self.boxes[k].oy, self.boxes[k].ox, k))

    def batches(self, order: list[int]):
        p, bs = self.patch, self.batch_size
        finite = np.array([k for k in range(len(self._points)) if np.isfinite(self._points[k]).all()], np.int64)
        # bounding boxes of the squiggles, to find those that may enter a patch without a loop over all
        bb = np.array([[*self._points[k].min(axis=0), *self._points[k].max(axis=0)] for k in finite]).reshape(-1, 4)
        buf = np.zeros((bs, 5, p, p), np.float32)
        meta: list[int] = []
        for k in order:
            t = time.perf_counter()
            box = self.boxes[k]
            img = self.slide.read_region(box.x0, box.y0, box.size, box.size, p, p)
            n = len(meta)
            buf[n, :3] = img.transpose(2, 0, 1).astype(np.float32) / 255.0
            x0, y0, x1, y1 = box.x0, box.y0, box.x0 + box.size, box.y0 + box.size
            near = finite[(bb[:, 2] >= x0) & (bb[:, 0] < x1) & (bb[:, 3] >= y0) & (bb[:, 1] < y1) & (finite != k)]
            buf[n, 3], buf[n, 4] = guidance_maps(self._points[k], [self._points[j] for j in near], box)
            meta.append(k)
            self.timer.add("read", time.perf_counter() - t)
            if len(meta) == bs:
                yield buf.copy(), meta
                meta = []
        if meta:
            yield buf[: len(meta)].copy(), meta

    def piece(self, prob: np.ndarray, k: int) -> Piece | None:
        """Probability patch of squiggle ``k`` -> a level-0 instance crop (or None, reason recorded)."""
        box = self.boxes[k]
        s = box.step
        if s == 1.0 and float(box.x0).is_integer() and float(box.y0).is_integer():
            u0, v0 = int(box.x0), int(box.y0)
            grid = prob
        else:
            u0, v0 = math.floor(box.x0), math.floor(box.y0)
            w, h = math.ceil(box.x0 + box.size) - u0, math.ceil(box.y0 + box.size) - v0
            off = [(v0 + 0.5 - box.y0) / s - 0.5, (u0 + 0.5 - box.x0) / s - 0.5]
            grid = ndi.affine_transform(prob, [1 / s, 1 / s], offset=off, output_shape=(h, w), order=1,
                                        mode="nearest")
        seed = np.zeros(grid.shape, bool)
        rr, cc = polyline_pixels(self._points[k] - [u0, v0])
        ok = (rr >= 0) & (rr < grid.shape[0]) & (cc >= 0) & (cc < grid.shape[1])
        seed[rr[ok], cc[ok]] = True
        mask, where = instance_from_probability(grid, seed, self.params)
        if mask is None:
            self.reasons[k] = where
            return None
        (r0, c0), (h, w) = where, mask.shape
        return Piece(label=self.label_of(k), x0=u0 + c0, y0=v0 + r0, mask=mask,
                     prob=grid[r0:r0 + h, c0:c0 + w].astype(np.float16), seed=seed[r0:r0 + h, c0:c0 + w] & mask,
                     meta={"index": k})

    def retire(self, piece: Piece) -> None:
        t = time.perf_counter()
        k = piece.meta["index"]
        sq: Squiggle = self.prompts.squiggles[k]
        area = float(piece.mask.sum())
        score = float(piece.prob[piece.mask].astype(np.float32).mean())
        rr, cc = np.nonzero(piece.mask)
        cxm, cym = piece.x0 + cc.mean() + 0.5, piece.y0 + rr.mean() + 0.5
        geom = trace_mask(piece.mask, piece.x0, piece.y0)
        area_um2 = area * self.mpp ** 2
        x, y = sq.points[0]
        uid = deterministic_uuid(self.stem, k, x, y, "gland")
        self.instances.append(Instance(label=piece.label, uuid=uid, geometry=geom, class_name=sq.class_name,
                                       color=sq.color, area_px=area, area_um2=area_um2, score=score,
                                       prompt_index=k, kind="gland"))
        self.table.append({"label": piece.label, "prompt_index": k, "class_name": sq.class_name, "x": x, "y": y,
                           "centroid_x": round(cxm, 3), "centroid_y": round(cym, 3), "area_px": area,
                           "area_um2": area_um2, "score": round(score, 6), "kind": "gland"})
        self.timer.add("write", time.perf_counter() - t)

    def run(self, store, progress=None, chunk: int = 1024) -> None:
        """Segment every valid squiggle; write labels through ``store.write_chunk``.

        Pieces are added in the order their boxes start from the top; a box holds its whole piece,
        so the chunk rows above the next box's top are final and are flushed before it is added.
        """
        order = self.plan()

        def write_chunk(cy, cx, block):
            t = time.perf_counter()
            store.write_chunk(cy, cx, block)
            self.timer.add("write", time.perf_counter() - t)

        stitcher = Stitcher(self.slide.width, self.slide.height, getattr(store, "chunk", chunk), write_chunk,
                            self.retire)
        for prob, meta in background(self.predictor.run(self.batches(order), self.timer), depth=2):
            t = time.perf_counter()
            for i, k in enumerate(meta):
                tw = self.timer.seconds["write"]
                stitcher.flush(math.floor(self.boxes[k].y0))
                t += self.timer.seconds["write"] - tw
                piece = self.piece(prob[i], k)
                if piece is not None:
                    stitcher.add(piece)
            self.timer.add("post", time.perf_counter() - t)
            if progress is not None:
                progress.update(len(meta))
        tw = self.timer.seconds["write"]
        t = time.perf_counter()
        stitcher.close()
        self.timer.add("post", time.perf_counter() - t - (self.timer.seconds["write"] - tw))

    def segment(self, path, options, progress: bool = False) -> None:
        """Run into a new label store at ``path`` (``S.glands.zarr``'s temporary) and finalize it."""
        from .store import LabelStore

        bar = None
        n = len(self.prompts.squiggles) - len(self.reasons)
        if progress and n:
            import sys

            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"{self.stem} glands", unit="glands", file=sys.stderr, dynamic_ncols=True)
        try:
            store = LabelStore.create(path, self.slide.width, self.slide.height, chunk=options.chunk, name="glands",
                                      mpp=self.mpp, ngff_version=options.ngff)
            self.run(store, bar)
            t = time.perf_counter()
            self.instances.sort(key=lambda i: i.label)
            self.table.sort(key=lambda r: r["label"])
            store.finalize(self.table, colors=None)
            self.timer.add("write", time.perf_counter() - t)
        finally:
            if bar is not None:
                bar.close()

    def records(self) -> list[dict[str, Any]]:
        """One report record per squiggle, in input order."""
        by_index = {i.prompt_index: i for i in self.instances}
        out = []
        for k, s in enumerate(self.prompts.squiggles):
            pts = self._points[k]
            rec: dict[str, Any] = {"index": k, "x": float(pts[0, 0]), "y": float(pts[0, 1]), "n_points": len(pts),
                                   "class": s.class_name, "source": s.source}
            box = self.boxes.get(k)
            if box is not None:
                rec["patch"] = {"x": round(box.x0, 3), "y": round(box.y0, 3), "size": round(box.size, 3),
                                "downscale": round(box.downscale, 4)}
            rec.update(outcome(by_index.get(k),
                               self.reasons.get(k, "nothing segmented: lost every pixel to neighbouring glands")))
            out.append(rec)
        return out

    def model_section(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"source": self.model.source, "arch": self.model.arch, "task": self.model.task,
                "patch_size": self.patch, "mpp": self.model.mpp, "level0_px_per_model_px": self.scale,
                "context": self.context, "postprocess": asdict(self.model_params)}


def predict_gland_labels(slide: SlideSource, prompts: Prompts, model: LoadedModel, *, mpp: float | None = None,
                         predictor: Predictor | None = None, params: PostParams | None = None,
                         first_label: int = 1, device: str = "auto", precision: str = "auto",
                         chunk: int = 1024, stem: str = "array", context: float = CONTEXT
                         ) -> tuple[np.ndarray, list[Instance], dict[int, str]]:
    """Segment the squiggles of ``prompts`` on a small slide, in memory (no files).

    Returns the label image (ids = ``first_label`` + squiggle index), the instances and, per
    squiggle index, the reason it gave no instance. Runs the code path of ``segment``.
    """
    from .pipeline import ArrayLabels
    from .slide import require_mpp

    if model.task != "gland":
        raise ModelError(f"{model.source}: a {model.task} model, not a gland model")
    mpp = mpp if mpp is not None else require_mpp(slide)
    predictor = predictor or Predictor(model, device, precision)
    pp = model.postprocess
    params = params or PostParams(float(pp["threshold"]), float(pp["min_object_px"]), float(pp["min_hole_px"]))
    run = GlandRun(slide, prompts, model, predictor, params, stem, mpp, first_label=first_label, context=context)
    run.reasons = {k: r for k, r in enumerate(check_squiggles(prompts, slide)) if r is not None}
    store = ArrayLabels(slide.width, slide.height, chunk)
    run.run(store, None)
    run.instances.sort(key=lambda i: i.label)
    return store.labels, run.instances, run.reasons


def add_to_report(report: dict[str, Any], run: GlandRun) -> None:
    """Add the glands to a ``segment`` report: ``squiggles`` records, ``gland_model``, totals, timing."""
    records = run.records()
    reasons: dict[str, int] = {}
    for rec in records:
        if rec["status"] == "skipped":
            key = rec["reason"].split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    n_seg = sum(r["status"] == "segmented" for r in records)
    report["gland_model"] = run.model_section()
    report.setdefault("totals", {}).update(squiggles=len(records), glands_segmented=n_seg,
                                           glands_skipped=len(records) - n_seg, glands_skipped_by_reason=reasons)
    timings = report.setdefault("timings_s", {})
    timings.update({k: round(v, 3) for k, v in run.timer.seconds.items()})
    wall = timings.get("wall")
    timings["glands_per_s"] = round(n_seg / wall, 2) if wall else None
    if not run.prompts.clicks:
        report["model"] = None  # no clicks: the (empty) nucleus run used no model
    report["squiggles"] = records
