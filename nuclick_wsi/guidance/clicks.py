"""Patch planning and guidance maps.

Clicks are grouped into regions of the slide so that neighbouring clicks share one read; each click
gets a patch at the model's resolution centred on the model pixel that contains it, with an
inclusion map (the click) and an exclusion map (every other click inside the patch).

Frames: a click (x, y) is in level-0 pixels (QuPath's frame). ``scale`` is level-0 pixels per
model pixel (model um/px divided by slide um/px). A region read from level-0 origin (X0, Y0) has
model pixel (i, j) centred on level-0 point (X0 + (j + 0.5) * scale, Y0 + (i + 0.5) * scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.guidance.duplicates import duplicate_of
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.records import Prompts

#: a model/slide resolution ratio this close to 1 is read natively, without resampling
NATIVE_TOLERANCE = 0.05


def effective_scale(model_mpp: float, slide_mpp: float) -> float:
    """Level-0 pixels per model pixel; exactly 1.0 when within :data:`NATIVE_TOLERANCE` of it."""
    s = model_mpp / slide_mpp
    return 1.0 if abs(s - 1.0) <= NATIVE_TOLERANCE else s


@dataclass
class Region:
    """One slide read serving several clicks."""

    x0: float  #: level-0 origin of the read
    y0: float
    width: int  #: size in model pixels
    height: int
    clicks: np.ndarray  #: indices (into the planned click arrays) of the clicks it serves
    row: int  #: band index, for streaming flushes (regions come in non-decreasing row order)


def plan_regions(xs: np.ndarray, ys: np.ndarray, scale: float, patch: int, *, tile: int = 512,
                 limit: tuple[int, int] | None = None, ties: np.ndarray | None = None) -> list[Region]:
    """Group clicks into reads on a grid of ``tile`` model pixels, in row-major order.

    Each region is the bounding box of its clicks' patches, so an isolated click costs one
    ``patch``-sized read and a crowded tile one read of at most ``tile + patch`` pixels a side.
    A region's clicks come by y, then x, then ``ties`` (default: their order in ``xs``).
    """
    half = patch // 2
    tile_l0 = tile * scale
    tx = np.floor(xs / tile_l0).astype(np.int64)
    ty = np.floor(ys / tile_l0).astype(np.int64)
    order = np.lexsort((np.arange(len(xs)) if ties is None else ties, xs, ys, tx, ty))
    regions: list[Region] = []
    if not len(order):
        return regions
    keys = np.stack([ty[order], tx[order]], axis=1)
    splits = np.nonzero(np.any(np.diff(keys, axis=0) != 0, axis=1))[0] + 1
    for group in np.split(order, splits):
        # model-pixel grid anchored at level-0 origin: click k lies in grid pixel floor(x / scale)
        gx = np.floor(xs[group] / scale).astype(np.int64)
        gy = np.floor(ys[group] / scale).astype(np.int64)
        ox, oy = gx.min() - half, gy.min() - half
        w, h = gx.max() - ox + half, gy.max() - oy + half
        regions.append(Region(x0=ox * scale, y0=oy * scale, width=int(w), height=int(h), clicks=group,
                              row=int(ty[group[0]])))
    return regions


def patch_origin(x: float, y: float, region: Region, scale: float, patch: int) -> tuple[int, int]:
    """Top-left (col, row) inside the region's pixels of the patch centred on click (x, y)."""
    half = patch // 2
    cx = int(math.floor(x / scale)) - int(round(region.x0 / scale))
    cy = int(math.floor(y / scale)) - int(round(region.y0 / scale))
    return cx - half, cy - half


class ExclusionIndex:
    """Finds the other clicks inside a patch (a k-d tree over model-pixel click positions)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, scale: float) -> None:
        self.gx = np.floor(xs / scale).astype(np.int64)
        self.gy = np.floor(ys / scale).astype(np.int64)
        self.tree = cKDTree(np.stack([self.gx, self.gy], axis=1)) if len(xs) else None

    def neighbours(self, k: int, patch: int) -> list[tuple[int, int]]:
        """(column, row) in click ``k``'s patch of every other click the patch holds."""
        half = patch // 2
        out = []
        if self.tree is not None:
            near = self.tree.query_ball_point([self.gx[k], self.gy[k]], r=half * math.sqrt(2) + 1, p=2.0)
            for j in near:
                if j == k:
                    continue
                c = int(self.gx[j] - self.gx[k] + half)
                r = int(self.gy[j] - self.gy[k] + half)
                if 0 <= c < patch and 0 <= r < patch and not (r == half and c == half):
                    out.append((c, r))
        return out

    def maps(self, k: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
        """Inclusion and exclusion maps (float32, patch x patch) for click ``k``."""
        half = patch // 2
        incl = np.zeros((patch, patch), np.float32)
        incl[half, half] = 1.0
        excl = np.zeros((patch, patch), np.float32)
        for c, r in self.neighbours(k, patch):
            excl[r, c] = 1.0
        return incl, excl


def check_clicks(prompts: Prompts, slide: SlideSource, duplicate_px: float,
                 precedence: list[int] | None = None) -> list[str | None]:
    """Per click: None when it is to be segmented, else the reason it is not.

    Of two duplicates the one first in ``precedence`` (a key per click, e.g. its label id; default:
    the file order) is kept.
    """
    n = len(prompts.clicks)
    xs = np.array([c.x for c in prompts.clicks], float)
    ys = np.array([c.y for c in prompts.clicks], float)
    reasons: list[str | None] = [None] * n
    outside = (xs < 0) | (ys < 0) | (xs >= slide.width) | (ys >= slide.height) | ~np.isfinite(xs) | ~np.isfinite(ys)
    for k in np.flatnonzero(outside):
        reasons[k] = f"outside the slide ({slide.width} x {slide.height} px)"
    inside = np.flatnonzero(~outside)
    if precedence is not None:
        inside = inside[np.argsort(np.asarray(precedence)[inside], kind="stable")]
    if len(inside) > 1 and duplicate_px > 0:
        of = duplicate_of(xs[inside], ys[inside], duplicate_px)  # O(n) memory (a grid), however crowded
        for j in np.flatnonzero(of >= 0):
            # "duplicate (...)": the report groups skipped clicks by the text before " ("
            reasons[inside[j]] = f"duplicate (of click {inside[of[j]]}, within {duplicate_px:g} px)"
    return reasons


def roi_reasons(prompts: Prompts, reasons: list[str | None], points_path) -> list[str | None]:
    """``--roi``: clicks outside every region (area annotation) of the file get "outside the ROI".

    A click on a region's edge is inside. A file without regions is an error, and so is a file
    whose clicks all lie outside its regions.
    """
    from shapely import make_valid, points as _points, union_all
    from shapely.prepared import prep

    if not prompts.regions:
        raise NuclickError(f"{points_path}: --roi, but the file has no area annotations (polygons) to limit the work to")
    area = prep(union_all([make_valid(g) for g in prompts.regions]))  # hand-drawn outlines may self-intersect
    pts = _points([(c.x, c.y) for c in prompts.clicks])
    out = list(reasons)
    for k, p in enumerate(pts):
        if out[k] is None and not area.covers(p):
            out[k] = f"outside the ROI ({len(prompts.regions)} area annotation(s))"
    if all(r is not None for r in out) and any(r is None for r in reasons):
        raise NuclickError(f"{points_path}: --roi: none of its clicks lies inside its {len(prompts.regions)} "
                           "area annotation(s)")
    return out
