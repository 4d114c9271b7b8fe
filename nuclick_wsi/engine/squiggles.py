"""The squiggle strategy: one patch per squiggle, its box grown or downscaled (see :mod:`.run`).

Geometry, guidance maps and frames: :mod:`nuclick_wsi.guidance.squiggles`. Label ids: squiggle
``k`` gets id ``first_label + k``, the id table's next free ids after the clicks' (one id space
across both label arrays). Glands are always recomputed on a rerun.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from nuclick_wsi.engine.background import Timer
from nuclick_wsi.guidance.clicks import effective_scale
from nuclick_wsi.guidance.squiggles import CONTEXT, GlandBox, guidance_maps, polyline_pixels, squiggle_box
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.postprocess.trace import deterministic_uuid
from nuclick_wsi.postprocess.resample import to_level0
from nuclick_wsi.records import Prompts
from nuclick_wsi.store.rerun import PackedPiece

#: gland patches per inference batch (512 x 512 x 5 float32 = 5 MB each)
BATCH = 8


class SquiggleStrategy:
    """Squiggles: a batch item is the squiggle's index; pieces come in the order their boxes start
    from the top, and a box holds its whole piece, so the rows above the next box are final."""

    kind = "gland"
    lost = "nothing segmented: lost every pixel to neighbouring glands"

    def __init__(self, slide: SlideSource, prompts: Prompts, model_mpp: float, patch: int, mpp: float, *,
                 first_label: int, batch_size: int = BATCH, context: float = CONTEXT, stem: str = "") -> None:
        self.slide, self.prompts, self.stem = slide, prompts.squiggles, stem
        self.scale = effective_scale(model_mpp, mpp)
        self.patch, self.first_label = patch, int(first_label)
        self.batch_size, self.context = max(1, int(batch_size)), context
        self.boxes: dict[int, GlandBox] = {}
        self.points = [np.asarray(s.points, float).reshape(-1, 2) for s in self.prompts]

    def plan(self, reasons: dict[int, str]) -> list[int]:
        """Pending squiggles in the order their boxes start from the top (the stitcher streams rows)."""
        valid = [k for k in range(len(self.prompts)) if k not in reasons]
        for k in valid:
            self.boxes[k] = squiggle_box(self.points[k], self.scale, self.patch, context=self.context)
        return sorted(valid, key=lambda k: (self.boxes[k].oy, self.boxes[k].ox, k))

    def batches(self, order: list[int], timer: Timer):
        """(batch, items) of guided patches (runs in the producer thread)."""
        p, bs = self.patch, self.batch_size
        finite = np.array([k for k in range(len(self.points)) if np.isfinite(self.points[k]).all()], np.int64)
        # bounding boxes of the squiggles, to find those that may enter a patch without a loop over all
        bb = np.array([[*self.points[k].min(axis=0), *self.points[k].max(axis=0)] for k in finite]).reshape(-1, 4)
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
            buf[n, 3], buf[n, 4] = guidance_maps(self.points[k], [self.points[j] for j in near], box)
            meta.append(k)
            timer.add("read", time.perf_counter() - t)
            if len(meta) == bs:
                yield buf.copy(), meta
                meta = []
        if meta:
            yield buf[: len(meta)].copy(), meta

    def flush_y(self, k: int) -> float:
        return math.floor(self.boxes[k].y0)

    def locate(self, prob: np.ndarray, k: int):
        box = self.boxes[k]
        grid, u0, v0 = to_level0(prob, box.x0, box.y0, box.size, box.step)
        seed = np.zeros(grid.shape, bool)
        rr, cc = polyline_pixels(self.points[k] - [u0, v0])
        ok = (rr >= 0) & (rr < grid.shape[0]) & (cc >= 0) & (cc < grid.shape[1])
        seed[rr[ok], cc[ok]] = True
        return grid, u0, v0, seed, k

    def label_of(self, index: int) -> int:
        return self.first_label + index

    def uuid_of(self, index: int) -> str:
        x, y = self.anchor(index)
        return deterministic_uuid(self.stem, index, x, y, self.kind)

    def slot(self, item: int, position: int) -> int:
        return position  # glands are always recomputed (no rerun reuse)

    def reuse(self, item: int) -> PackedPiece:
        raise RuntimeError("squiggles are never reused")

    def remember(self, item: int, piece: PackedPiece) -> None:
        pass

    def anchor(self, index: int) -> tuple[float, float]:
        x, y = self.prompts[index].points[0]
        return x, y

    def record(self, index: int) -> dict[str, Any]:
        s, pts = self.prompts[index], self.points[index]
        rec: dict[str, Any] = {"index": index, "x": float(pts[0, 0]), "y": float(pts[0, 1]), "n_points": len(pts),
                               "class": s.class_name, "source": s.source}
        box = self.boxes.get(index)
        if box is not None:
            rec["patch"] = {"x": round(box.x0, 3), "y": round(box.y0, 3), "size": round(box.size, 3),
                            "downscale": round(box.downscale, 4)}
        return rec

    def section(self) -> dict[str, Any]:
        """The gland-specific part of the report's ``gland_model`` section."""
        return {"mpp_scale": self.scale, "context": self.context}
