"""The click strategy: one patch per click, centred on it, read region by region (see :mod:`.run`)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from nuclick_wsi.engine.background import Timer
from nuclick_wsi.guidance.clicks import ExclusionIndex, effective_scale, patch_origin, plan_regions
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.postprocess.resample import to_level0
from nuclick_wsi.records import Prompts

#: side of the regions clicks are grouped into, model pixels
TILE = 512


class ClickStrategy:
    """Clicks: patches of ``patch`` model pixels centred on each click; label = click index + 1.

    A batch item is ``(index, region row, level-0 x, level-0 y of the patch)``; the stitcher's rows
    above a region row (less a patch's reach) are final once the next region row starts.
    """

    kind = "nucleus"
    lost = "nothing segmented: lost every pixel to neighbouring instances"

    def __init__(self, slide: SlideSource, prompts: Prompts, model_mpp: float, patch: int, mpp: float, *,
                 batch_size: int = 64, duplicate_px: float = 2.0) -> None:
        self.slide, self.prompts_all, self.prompts = slide, prompts, prompts.clicks
        self.scale = effective_scale(model_mpp, mpp)
        self.patch, self.batch_size, self.duplicate_px = patch, batch_size, duplicate_px
        self._row = -1

    def plan(self, reasons: dict[int, str]) -> list[int]:
        """Pending clicks; a click in the model pixel of an earlier one is a duplicate (in ``reasons``)."""
        valid = [k for k in range(len(self.prompts)) if k not in reasons]
        if self.duplicate_px > 0 and self.scale > 1:
            # a model pixel wider than duplicate_px can hold two clicks that are not duplicates in
            # level-0 px: both would get the same patch and the later one a 1 px instance
            seen: dict[tuple[int, int], int] = {}
            for k in valid:
                c = self.prompts[k]
                key = (math.floor(c.x / self.scale), math.floor(c.y / self.scale))
                if key in seen:
                    reasons[k] = f"duplicate (of click {seen[key]}, in the same model pixel)"
                else:
                    seen[key] = k
            valid = [k for k in valid if k not in reasons]
        return valid

    def batches(self, order: list[int], timer: Timer):
        """(batch, items) of guided patches, region by region (runs in the producer thread)."""
        xs = np.array([self.prompts[k].x for k in order], float)
        ys = np.array([self.prompts[k].y for k in order], float)
        ids = np.array(order, np.int64)
        regions = plan_regions(xs, ys, self.scale, self.patch, tile=TILE)
        p, half, bs = self.patch, self.patch // 2, self.batch_size
        excl = ExclusionIndex(xs, ys, self.scale)
        buf = np.zeros((bs, 5, p, p), np.float32)
        meta: list[tuple[int, int, float, float]] = []
        for region in regions:
            t = time.perf_counter()
            img = self.slide.read_region(region.x0, region.y0, region.width * self.scale, region.height * self.scale,
                                         region.width, region.height)
            timer.add("read", time.perf_counter() - t)
            t = time.perf_counter()
            for k in region.clicks:
                c0, r0 = patch_origin(xs[k], ys[k], region, self.scale, p)
                n = len(meta)
                np.multiply(img[r0:r0 + p, c0:c0 + p].transpose(2, 0, 1), np.float32(1 / 255), out=buf[n, :3])
                buf[n, 3], buf[n, 4] = excl.maps(int(k), p)
                gx, gy = math.floor(xs[k] / self.scale), math.floor(ys[k] / self.scale)
                meta.append((int(ids[k]), region.row, (gx - half) * self.scale, (gy - half) * self.scale))
                if len(meta) == bs:
                    timer.add("read", time.perf_counter() - t)
                    yield buf.copy(), meta
                    t = time.perf_counter()
                    meta = []
            timer.add("read", time.perf_counter() - t)
        if meta:
            yield buf[: len(meta)].copy(), meta

    def flush_y(self, item: tuple[int, int, float, float]) -> float | None:
        row = item[1]
        if row == self._row:
            return None
        self._row = row
        return row * TILE * self.scale - (self.patch // 2 + 2) * self.scale

    def locate(self, prob: np.ndarray, item: tuple[int, int, float, float]):
        idx, _, px0, py0 = item
        click = self.prompts[idx]
        grid, u0, v0 = to_level0(prob, px0, py0, self.patch * self.scale, self.scale)
        seed = (math.floor(click.y) - v0, math.floor(click.x) - u0)
        return grid, u0, v0, seed, idx

    def label_of(self, index: int) -> int:
        return index + 1

    def anchor(self, index: int) -> tuple[float, float]:
        c = self.prompts[index]
        return c.x, c.y

    def record(self, index: int) -> dict[str, Any]:
        c = self.prompts[index]
        return {"index": index, "x": c.x, "y": c.y, "class": c.class_name, "source": c.source}
