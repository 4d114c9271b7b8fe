"""Stitching instance masks into a slide-sized label image, streamed chunk row by chunk row.

Instances arrive as small level-0 crops. Where two claim a pixel, the one with the higher
probability keeps it, except that a click's own pixel always stays with its click; afterwards each
instance is cut back to the 4-connected component that contains its click, so every instance is
one connected component containing its click. Once no later click can reach a band of chunk rows,
the band is painted, written chunk by chunk and its finished instances are traced to polygons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

_FOUR = ndi.generate_binary_structure(2, 1)
_CELL = 64  #: side of the grid cells indexing active instances (about 3 nuclei wide)


@dataclass
class Piece:
    """One instance while it is being stitched (level-0 crop)."""

    label: int
    x0: int
    y0: int
    mask: np.ndarray  #: bool (h, w)
    prob: np.ndarray  #: float16 (h, w)
    seed: np.ndarray  #: bool (h, w): pixels that must stay (the click, or the squiggle)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]


def _keep_seeded(piece: Piece) -> None:
    lab, n = ndi.label(piece.mask, structure=_FOUR)
    if n > 1 or not (piece.seed & piece.mask).any():  # one component, but without the click: drop it
        keep = np.unique(lab[piece.seed & piece.mask])
        keep = keep[keep > 0]
        piece.mask = np.isin(lab, keep)


def _trim(piece: Piece) -> None:
    """Shrink the crop to the mask's bounding box."""
    rows = np.flatnonzero(piece.mask.any(axis=1))
    cols = np.flatnonzero(piece.mask.any(axis=0))
    if not len(rows):
        return
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (r0, c0) == (0, 0) and (r1, c1) == piece.mask.shape:
        return
    piece.mask, piece.prob, piece.seed = (a[r0:r1, c0:c1] for a in (piece.mask, piece.prob, piece.seed))
    piece.x0 += int(c0)
    piece.y0 += int(r0)


class Stitcher:
    """Resolves overlaps between instances and streams finished chunk rows out.

    Parameters
    ----------
    width, height : int
        Level-0 size of the label image.
    chunk : int
        Chunk side of the label store.
    write_chunk : callable(cy, cx, block)
        Receives every non-empty chunk exactly once.
    retire : callable(Piece)
        Receives every instance once its pixels are final.
    """

    def __init__(self, width: int, height: int, chunk: int, write_chunk: Callable[[int, int, np.ndarray], None],
                 retire: Callable[[Piece], None]) -> None:
        self.width, self.height, self.chunk = width, height, chunk
        self.write_chunk, self.retire = write_chunk, retire
        self.active: dict[int, Piece] = {}
        self.grid: dict[tuple[int, int], set[int]] = {}
        self.next_row = 0  #: first chunk row not yet written

    def _cells(self, p: Piece):
        for gy in range(p.y0 // _CELL, (p.y1 - 1) // _CELL + 1):
            for gx in range(p.x0 // _CELL, (p.x1 - 1) // _CELL + 1):
                yield gy, gx

    def add(self, piece: Piece) -> None:
        """Add one instance, resolving its overlaps with the instances already there."""
        if self._clip(piece):
            _keep_seeded(piece)  # cutting at the slide's edge may split the instance
        if not piece.mask.any():
            return
        _trim(piece)
        if piece.y0 < self.next_row * self.chunk:
            raise RuntimeError("instance added above rows already written (regions out of order)")
        touched = []
        candidates = set()
        for cell in self._cells(piece):
            candidates |= self.grid.get(cell, set())
        for lab in sorted(candidates):
            other = self.active[lab]
            x0, y0 = max(piece.x0, other.x0), max(piece.y0, other.y0)
            x1, y1 = min(piece.x1, other.x1), min(piece.y1, other.y1)
            if x0 >= x1 or y0 >= y1:
                continue
            sp = (slice(y0 - piece.y0, y1 - piece.y0), slice(x0 - piece.x0, x1 - piece.x0))
            so = (slice(y0 - other.y0, y1 - other.y0), slice(x0 - other.x0, x1 - other.x0))
            both = piece.mask[sp] & other.mask[so]
            if not both.any():
                continue
            new_wins = piece.prob[sp] > other.prob[so]
            new_wins = (new_wins | piece.seed[sp]) & ~other.seed[so]
            other.mask[so] &= ~(both & new_wins)
            piece.mask[sp] &= ~(both & ~new_wins)
            touched.append(other)
        if touched:
            for p in (*touched, piece):
                _keep_seeded(p)
            if not piece.mask.any():  # its click's pixel is another click's: nothing left of it
                return
        self.active[piece.label] = piece
        piece.meta["_cells"] = list(self._cells(piece))
        for cell in piece.meta["_cells"]:
            self.grid.setdefault(cell, set()).add(piece.label)

    def _clip(self, p: Piece) -> bool:
        """Cut the piece to the slide; True when something was cut off."""
        c0, r0 = max(0, -p.x0), max(0, -p.y0)
        c1 = p.mask.shape[1] - max(0, p.x1 - self.width)
        r1 = p.mask.shape[0] - max(0, p.y1 - self.height)
        if (c0, r0) != (0, 0) or (r1, c1) != p.mask.shape:
            p.mask, p.prob, p.seed = (a[r0:r1, c0:c1] for a in (p.mask, p.prob, p.seed))
            p.x0 += c0
            p.y0 += r0
            return True
        return False

    def flush(self, final_y: float) -> None:
        """Write every chunk row lying entirely above ``final_y`` (level-0 y) and retire its instances."""
        nrows = -(-self.height // self.chunk)
        last = nrows if final_y >= self.height else int(final_y // self.chunk)
        # an instance reaching below final_y may still lose pixels to a later one, and then be cut
        # back to its click's component anywhere in its crop: keep its rows unwritten until then
        for p in self.active.values():
            if p.y1 > final_y:
                last = min(last, p.y0 // self.chunk)
        for row in range(self.next_row, min(last, nrows)):
            self._write_row(row)
            self.next_row = row + 1

    def close(self) -> None:
        """Write everything left."""
        self.flush(float("inf"))

    def _write_row(self, row: int) -> None:
        c = self.chunk
        ry0, ry1 = row * c, min((row + 1) * c, self.height)
        pieces = [p for p in self.active.values() if p.y0 < ry1 and p.y1 > ry0]
        # one chunk in memory at a time (a whole row of a 100k px wide slide would be ~400 MB)
        by_cx: dict[int, list[Piece]] = {}
        for p in sorted(pieces, key=lambda q: q.label):
            for cx in range(p.x0 // c, (p.x1 - 1) // c + 1):
                by_cx.setdefault(cx, []).append(p)
        for cx in sorted(by_cx):
            cx0, cx1 = cx * c, min((cx + 1) * c, self.width)
            block = np.zeros((ry1 - ry0, cx1 - cx0), np.uint32)
            for p in by_cx[cx]:
                y0, y1 = max(p.y0, ry0), min(p.y1, ry1)
                x0, x1 = max(p.x0, cx0), min(p.x1, cx1)
                m = p.mask[y0 - p.y0:y1 - p.y0, x0 - p.x0:x1 - p.x0]
                view = block[y0 - ry0:y1 - ry0, x0 - cx0:x1 - cx0]
                view[m] = p.label
            self.write_chunk(row, cx, block)
        for p in pieces:
            if p.y1 <= ry1:
                self._retire(p)

    def _retire(self, p: Piece) -> None:
        del self.active[p.label]
        for cell in p.meta.pop("_cells"):
            s = self.grid.get(cell)
            if s is not None:
                s.discard(p.label)
                if not s:
                    del self.grid[cell]
        self.retire(p)
