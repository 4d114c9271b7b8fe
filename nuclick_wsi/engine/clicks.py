"""The click strategy: one patch per click, centred on it, read region by region (see :mod:`.run`)."""

from __future__ import annotations

import hashlib
import math
import queue
import time
from typing import Any

import numpy as np

from nuclick_wsi.engine.background import Timer
from nuclick_wsi.engine.identity import fresh_ids
from nuclick_wsi.guidance.clicks import ExclusionIndex, effective_scale, patch_origin, plan_regions
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.postprocess.resample import to_level0
from nuclick_wsi.records import Prompts
from nuclick_wsi.store.rerun import PackedPiece

#: side of the regions clicks are grouped into, model pixels
TILE = 512


def signature(x: float, y: float, neighbours: list[tuple[int, int]], box: tuple | None) -> str:
    """What a click's piece is a function of, hashed: its exact position, the other clicks in its
    exclusion map, and, when the slide is resampled, the read its patch is cut from (the image
    itself, the model and the options are the run's fingerprint)."""
    text = repr((float(x).hex(), float(y).hex(), sorted(neighbours), box))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def content_signature(x: float, y: float, neighbours: list[tuple[int, int]], patch: np.ndarray) -> str:
    """A click's piece's content key: its exact position, its exclusion neighbours and the exact
    pixels of its patch as cut from the read (uint8 RGB), hashed: everything the network input and
    the post-processing are made of, whichever read box the patch was cut from."""
    pixels = hashlib.blake2b(np.ascontiguousarray(patch).tobytes(), digest_size=16).hexdigest()
    return signature(x, y, neighbours, ("content", patch.shape, pixels))


class ClickStrategy:
    """Clicks: patches of ``patch`` model pixels centred on each click; label ids from the id table
    (``labels``/``uuids``, per click; default: click index + 1 and its deterministic uuid).

    A batch item is ``(index, region row, level-0 x, level-0 y of the patch, batch slot, signature,
    source, content key)``; the slot is None for a click whose piece comes from ``cache`` (pieces of
    an earlier run by signature: :func:`signature`), ``source`` the earlier run's signature of that
    piece (None: computed here). The stitcher's rows above a region row (less a patch's reach) are
    final once the next region row starts. Ties in every order are broken by label id, never by the
    place in the file, so a reordered file gives the same run.

    On a resampled slide a click's signature holds its region's read box (resampled pixels may
    differ in their last bits in another box), so an edit that widens a region changes the
    signature of every click in it. Those clicks' patches are read and keyed by content
    (:func:`content_signature`); a click whose content key the earlier run has (``contents``:
    content key -> signature) reuses that piece: the same network input gives the same piece, batch
    mates aside (below). A click whose signature is in ``cache`` is reused without a read, with the
    earlier content key, unless the earlier run recorded none (an older state): then its patch is
    read to key it, so this run's state is a from-scratch run's.

    Batches always hold ``batch_size`` patches (the last one padded with zeros): some CPU kernels
    give a patch other bits in a batch of another size, and a rerun's batches differ from a full
    run's.
    """

    kind = "nucleus"
    lost = "nothing segmented: lost every pixel to neighbouring instances"

    def __init__(self, slide: SlideSource, prompts: Prompts, model_mpp: float, patch: int, mpp: float, *,
                 batch_size: int = 64, duplicate_px: float = 2.0, labels: list[int] | None = None,
                 uuids: list[str] | None = None, cache: dict[str, PackedPiece] | None = None, stem: str = "",
                 contents: dict[str, str] | None = None) -> None:
        self.slide, self.prompts_all, self.prompts = slide, prompts, prompts.clicks
        self.scale = effective_scale(model_mpp, mpp)
        self.patch, self.batch_size, self.duplicate_px = patch, batch_size, duplicate_px
        if labels is None or uuids is None:
            labels, uuids = fresh_ids(self.prompts, stem)
        self.labels, self.uuids = labels, uuids
        self.cache = cache or {}
        self.earlier_contents = contents or {}  #: the earlier run's content keys -> signatures
        self._content_of = {sig: key for key, sig in self.earlier_contents.items()}
        #: the pieces of this run by signature (reused or new): the next run's cache
        self.pieces: dict[str, PackedPiece] = {}
        self.contents: dict[str, str] = {}  #: this run's content keys -> signatures (resampled slides)
        self.reused = 0
        self._row = -1
        self._spare: queue.SimpleQueue = queue.SimpleQueue()  #: batch buffers to fill again

    def plan(self, reasons: dict[int, str]) -> list[int]:
        """Pending clicks; a click in the model pixel of one with a lower id is a duplicate (in ``reasons``)."""
        valid = sorted((k for k in range(len(self.prompts)) if k not in reasons), key=lambda k: self.labels[k])
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
        """(batch, items) of guided patches, region by region (runs in the producer thread).

        ``batch`` is None when every item of the group is reused.
        """
        xs = np.array([self.prompts[k].x for k in order], float)
        ys = np.array([self.prompts[k].y for k in order], float)
        ids = np.array(order, np.int64)
        regions = plan_regions(xs, ys, self.scale, self.patch, tile=TILE,
                               ties=np.array([self.labels[k] for k in order], np.int64))
        p, half, bs = self.patch, self.patch // 2, self.batch_size
        excl = ExclusionIndex(xs, ys, self.scale)
        buf = self._buffer()
        meta: list[tuple] = []
        n = 0
        for region in regions:
            t = time.perf_counter()
            box = None if self.scale == 1 else (region.x0, region.y0, region.width, region.height)
            near = [excl.neighbours(int(k), p) for k in region.clicks]
            sigs = [signature(xs[k], ys[k], nb, box) for k, nb in zip(region.clicks, near)]
            # reused without a read: native pixels, or a resampled read whose content key is known
            hit = [sig in self.cache and (box is None or sig in self._content_of) for sig in sigs]
            todo, read, img = region.clicks[~np.array(hit, bool)], region, None
            if box is None and 0 < len(todo) < len(hit):  # native pixels: read only the patches to compute
                read = plan_regions(xs[todo], ys[todo], self.scale, p, tile=TILE)[0]
            for k, nb, sig, fast in zip(region.clicks, near, sigs, hit):
                gx, gy = math.floor(xs[k] / self.scale), math.floor(ys[k] / self.scale)
                item = (int(ids[k]), region.row, (gx - half) * self.scale, (gy - half) * self.scale)
                if fast:
                    meta.append((*item, None, sig, sig, self._content_of.get(sig)))
                    continue
                if img is None:  # a region whose clicks are all reused is not read
                    img = self.slide.read_region(read.x0, read.y0, read.width * self.scale, read.height * self.scale,
                                                 read.width, read.height)
                c0, r0 = patch_origin(xs[k], ys[k], read, self.scale, p)
                patch = img[r0:r0 + p, c0:c0 + p]
                content = None if box is None else content_signature(xs[k], ys[k], nb, patch)
                source = sig if sig in self.cache else self.earlier_contents.get(content)
                if source is not None and source in self.cache:  # the same network input as an earlier piece's
                    meta.append((*item, None, sig, source, content))
                    continue
                np.multiply(patch.transpose(2, 0, 1), np.float32(1 / 255), out=buf[n, :3])
                buf[n, 3], buf[n, 4] = excl.maps(int(k), p)
                meta.append((*item, n, sig, None, content))
                n += 1
                if n == bs:
                    timer.add("read", time.perf_counter() - t)
                    yield buf, meta
                    t = time.perf_counter()
                    buf, meta, n = self._buffer(), [], 0
            timer.add("read", time.perf_counter() - t)
        if meta:
            buf[n:] = 0  # a full batch: the patches' bits do not depend on how many share it
            yield (buf if n else None), meta

    def _buffer(self) -> np.ndarray:
        """A batch buffer: one the network is done with (:meth:`release`), else a new one. Every row of a
        batch is written before it is sent (the unused rows of the last one zeroed)."""
        try:
            return self._spare.get_nowait()
        except queue.Empty:
            return np.zeros((self.batch_size, 5, self.patch, self.patch), np.float32)

    def release(self, batch: np.ndarray) -> None:
        """Hand back a batch the network is done with, to be filled again (fresh buffers cost page faults:
        a 21 MB buffer per batch of 64)."""
        self._spare.put(batch)

    def signature_of(self, item: tuple) -> str:
        """The signature of an item's piece (:func:`signature`)."""
        return item[5]

    def slot(self, item: tuple, position: int) -> int | None:
        """The item's row in its batch, None when its piece is reused."""
        return item[4]

    def source_of(self, item: tuple) -> str | None:
        """The signature under which the earlier run kept a reused item's piece (None: computed here)."""
        return item[6]

    def reuse(self, item: tuple) -> PackedPiece:
        """The earlier run's piece of a reused item (kept for the next run, under this run's signature)."""
        piece = self.cache[item[6]]
        self.remember(item, piece)
        self.reused += 1
        return piece

    def remember(self, item: tuple, piece: PackedPiece) -> None:
        """Keep a piece (or its reason) and its content key for the next run."""
        self.pieces[item[5]] = piece
        if item[7] is not None:
            self.contents[item[7]] = item[5]

    def flush_y(self, item: tuple) -> float | None:
        row = item[1]
        if row == self._row:
            return None
        self._row = row
        return row * TILE * self.scale - (self.patch // 2 + 2) * self.scale

    def locate(self, prob: np.ndarray, item: tuple):
        idx, _, px0, py0 = item[:4]
        click = self.prompts[idx]
        grid, u0, v0 = to_level0(prob, px0, py0, self.patch * self.scale, self.scale)
        seed = (math.floor(click.y) - v0, math.floor(click.x) - u0)
        return grid, u0, v0, seed, idx

    def label_of(self, index: int) -> int:
        return self.labels[index]

    def uuid_of(self, index: int) -> str:
        return self.uuids[index]

    def anchor(self, index: int) -> tuple[float, float]:
        c = self.prompts[index]
        return c.x, c.y

    def record(self, index: int) -> dict[str, Any]:
        c = self.prompts[index]
        return {"index": index, "x": c.x, "y": c.y, "class": c.class_name, "source": c.source}
