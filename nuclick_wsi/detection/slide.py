"""The detector over a whole slide: tissue tiles at its um/px, background reading, batched inference.

Tiles are ``tile`` detector pixels square and overlap by ``overlap`` on each side; the tile grid's
*cores* (the tile less its overlap, reaching the slide edge at the borders) partition the slide, and
a tile keeps only the peaks inside its core, so a point is proposed by exactly one tile. A nucleus
cut by a seam may still peak on both sides of it; distance NMS over all proposals (radius: the
detector's ``min_distance_um``) leaves one. Only tiles whose core touches tissue (or, when given, the
``roi`` areas instead) are read; memory holds a few tiles and the points found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nuclick_wsi.detection.peaks import heatmap_peaks, nms_points
from nuclick_wsi.detection.predict import heatmaps
from nuclick_wsi.detection.tissue import TissueMask, tissue_mask
from nuclick_wsi.engine.background import Timer, background
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.model.architectures.detector import STRIDE
from nuclick_wsi.model.weights import LoadedModel


@dataclass
class DetectOptions:
    """How the detector runs over a slide (the model brings its um/px, threshold and peak distance)."""

    threshold: float | None = None  #: default: the model's validated cut
    tile: int = 768  #: detector pixels (multiple of 16)
    overlap: int = 32  #: detector pixels of context on each side of a core
    batch_size: int = 4
    device: str = "auto"
    precision: str = "auto"
    mask_mpp: float = 8.0
    progress: bool = True


@dataclass
class Detections:
    """Proposals in level-0 pixels of the slide (QuPath frame), and how they were found."""

    xy: np.ndarray  #: (n, 2) x, y
    scores: np.ndarray  #: (n,)
    tiles: int
    tissue_px0: float  #: tissue area, level-0 pixels (inside the ROI when one was given)
    threshold: float
    precision: str
    timer: Timer = field(default_factory=Timer)
    seconds: float = 0.0


@dataclass(frozen=True)
class TileGrid:
    """Tile origins and cores in detector pixels (``factor`` level-0 pixels each)."""

    width: int
    height: int
    tile: int
    overlap: int
    factor: float

    @property
    def step(self) -> int:
        return self.tile - 2 * self.overlap

    def shape(self) -> tuple[int, int]:
        return math.ceil(self.height / self.step), math.ceil(self.width / self.step)

    def core(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Core of tile (row, col) in detector pixels: [x0, x1) x [y0, y1); border cores reach to infinity."""
        rows, cols = self.shape()
        x0 = -math.inf if col == 0 else col * self.step
        y0 = -math.inf if row == 0 else row * self.step
        x1 = math.inf if col == cols - 1 else (col + 1) * self.step
        y1 = math.inf if row == rows - 1 else (row + 1) * self.step
        return x0, y0, x1, y1

    def origin(self, row: int, col: int) -> tuple[int, int]:
        return col * self.step - self.overlap, row * self.step - self.overlap

    def core_box_px0(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The core clipped to the slide, in level-0 pixels."""
        x0, y0, x1, y1 = self.core(row, col)
        f = self.factor
        return (max(x0, 0) * f, max(y0, 0) * f, min(x1, self.width) * f, min(y1, self.height) * f)


def tiles_to_run(grid: TileGrid, tissue: TissueMask | None, roi: Any = None) -> list[tuple[int, int]]:
    """(row, col) of the tiles whose core touches tissue and the ROI (a prepared shapely geometry)."""
    from shapely.geometry import box

    rows, cols = grid.shape()
    out = []
    for r in range(rows):
        for c in range(cols):
            b = grid.core_box_px0(r, c)
            if tissue is not None and not tissue.touches(*b):
                continue
            if roi is not None and not roi.intersects(box(*b)):
                continue
            out.append((r, c))
    return out


def detect_slide(slide: SlideSource, model: LoadedModel, slide_mpp: float, *, options: DetectOptions | None = None,
                 roi: Any = None) -> Detections:
    """Proposals of ``model`` (a detector) over the tissue of ``slide``, or inside ``roi`` (shapely, level-0)."""
    from shapely import make_valid
    from shapely.prepared import prep

    from nuclick_wsi.model.precision import choose_precision
    from nuclick_wsi.model.predictor import resolve_device

    opts = options or DetectOptions()
    t0 = time.perf_counter()
    timer = Timer()
    device = resolve_device(opts.device)
    net = model.net.to(device).eval().to(memory_format=torch.channels_last)
    choice = choose_precision(net, device, opts.precision, patch_size=opts.tile, arch_key=(model.arch, model.arch_args),
                              in_channels=3)
    post = model.postprocess
    threshold = float(opts.threshold if opts.threshold is not None else post["threshold"])
    factor = model.mpp / slide_mpp  # level-0 pixels per detector pixel
    grid = TileGrid(math.ceil(slide.width / factor), math.ceil(slide.height / factor), opts.tile, opts.overlap, factor)
    area = prep(make_valid(roi)) if roi is not None else None
    tissue = None
    if area is None:  # the ROI, when given, replaces the tissue mask: the user said where to look
        t = time.perf_counter()
        tissue = tissue_mask(slide, slide_mpp, opts.mask_mpp)
        timer.add("read", time.perf_counter() - t)
    todo = tiles_to_run(grid, tissue, area)
    min_d = max(int(round(float(post.get("min_distance_um", 2.0)) / (model.mpp * STRIDE))), 1)
    xs, ss = [], []
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"propose {Path(slide.path).name}", unit="tiles")
    try:
        for batch in background(_read_batches(slide, grid, todo, opts.batch_size, timer), depth=2):
            t = time.perf_counter()
            probs = heatmaps(net, np.stack([rgb for _, rgb in batch]), device, choice.dtype)
            timer.add("infer", time.perf_counter() - t)
            t = time.perf_counter()
            for (rc, _), prob in zip(batch, probs):
                xy, sc = heatmap_peaks(prob, threshold, min_distance=min_d, stride=STRIDE)
                ox, oy = grid.origin(*rc)
                xy = xy + (ox, oy)
                x0, y0, x1, y1 = grid.core(*rc)
                own = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
                xs.append(xy[own] * factor)
                ss.append(sc[own])
            timer.add("post", time.perf_counter() - t)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    xy = np.concatenate(xs) if xs else np.zeros((0, 2))
    sc = np.concatenate(ss) if ss else np.zeros(0)
    keep = nms_points(xy, sc, float(post.get("min_distance_um", 2.0)) / slide_mpp)
    xy, sc = xy[keep], sc[keep]
    if area is None:
        tissue_px0 = tissue.area_px0()
    else:
        xy, sc, tissue_px0 = _inside_roi(xy, sc, roi, slide)
    return Detections(xy, sc, len(todo), tissue_px0, threshold, choice.name, timer, time.perf_counter() - t0)


def _inside_roi(xy: np.ndarray, sc: np.ndarray, roi: Any, slide: SlideSource) -> tuple[np.ndarray, np.ndarray, float]:
    """Proposals the ROI covers (its edge counts as inside), and the ROI's area on the slide (level-0 px)."""
    import shapely
    from shapely.geometry import box

    geom = shapely.make_valid(roi)
    inside = shapely.covers(geom, shapely.points(xy)) if len(xy) else np.zeros(0, bool)
    return xy[inside], sc[inside], float(geom.intersection(box(0, 0, slide.width, slide.height)).area)


def _read_batches(slide: SlideSource, grid: TileGrid, todo: list[tuple[int, int]], batch_size: int,
                  timer: Timer) -> Iterator[list[tuple[tuple[int, int], np.ndarray]]]:
    """Batches of ((row, col), RGB tile at the detector's um/px), read in order."""
    f, t = grid.factor, grid.tile
    batch = []
    for rc in todo:
        t0 = time.perf_counter()
        ox, oy = grid.origin(*rc)
        batch.append((rc, slide.read_region(ox * f, oy * f, t * f, t * f, t, t)))
        timer.add("read", time.perf_counter() - t0)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
