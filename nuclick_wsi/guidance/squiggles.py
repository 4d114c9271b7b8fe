"""Glands from squiggles: patch geometry and guidance maps (the run: :mod:`nuclick_wsi.engine.squiggles`).

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

Frames: as :mod:`nuclick_wsi.guidance.clicks`. The model-pixel grid is anchored at the level-0 origin;
``scale`` is level-0 pixels per model pixel. A :class:`GlandBox` of ``side`` model pixels at model
pixel ``(ox, oy)`` covers level-0 ``[ox * scale, (ox + side) * scale)`` (and likewise in y); patch
pixel ``(i, j)`` is centred on level-0 point ``(x0 + (j + 0.5) * step, y0 + (i + 0.5) * step)``
with ``step = side * scale / patch``.

Label ids: squiggle ``k`` of a file with ``n`` clicks gets id ``n + k + 1`` (clicks keep
``index + 1``), one id space across the nucleus and gland label arrays, the GeoJSON and the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage import draw

from nuclick_wsi.records import Prompts
from nuclick_wsi.io.slides.base import SlideSource

#: context around the squiggle's bounding box, as a fraction of its longer side (each side)
CONTEXT = 0.25
#: the least context, model pixels
MIN_CONTEXT = 16


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
