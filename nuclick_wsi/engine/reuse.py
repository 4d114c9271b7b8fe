"""Region reuse in incremental reruns: the instances no edit can reach are taken as the earlier run
left them, without unpacking, stitching or tracing them again.

Why that gives a from-scratch run's bytes. The stitcher (:mod:`nuclick_wsi.postprocess.stitch`)
lets two pieces act on each other only where their masks overlap, and a mask only loses pixels
while it is stitched, so pieces whose boxes (the crop of the piece before stitching) share no
pixel never interact. Take the graph whose nodes are this run's pieces and whose edges join pieces
with overlapping boxes. A connected component none of whose members is *dirty* is the same set of
pieces, with the same labels, stitched in the same relative order, as in the earlier run, and no
piece of the earlier run that is gone now touched it there; so every member ends up with the final
mask, area, score, centroid and outline the earlier run recorded (:attr:`RerunState.finals`). A piece is dirty when

* it was computed in this run (a new, moved or neighbour-touched click), or
* the earlier run did not stitch the same piece under the same label (a changed class gives the
  click a new id; older states record no finals), or
* its box overlaps the box of an earlier piece that this run does not stitch (deleted or moved
  clicks, clicks now skipped), which may have taken pixels from it there.

Only the dirty components are stitched. Label-store chunks they or the gone instances touch are the
earlier chunk with the labels of every instance not taken cleared, and the re-stitched instances
painted over them (they cannot overlap a taken instance: their boxes do not); every other chunk
file is copied. All of this requires the earlier store's level-0 chunk files to be intact
(:meth:`~nuclick_wsi.store.chunks.ChunkLedger.earlier_intact`); otherwise the rerun stitches every
piece (:meth:`~nuclick_wsi.engine.run.PromptRun.run`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.store.rerun import PackedPiece, final_key, split_final_key

Box = tuple[int, int, int, int]  #: x0, y0, x1, y1 (level-0 px, end exclusive)


@dataclass
class Entry:
    """One stitched item of this run, in stitching order."""

    flush_y: float | None  #: the stitcher's flush before the item (None: none)
    index: int  #: prompt index
    label: int
    signature: str
    piece: PackedPiece | None  #: the item's piece, packed (None: no piece, a reason)
    new: bool = False  #: computed in this run (not the earlier run's)
    #: the signature the earlier run kept a reused piece under (None: ``signature``); they differ for
    #: a piece reused by its content key (:func:`~nuclick_wsi.engine.clicks.content_signature`)
    earlier: str | None = None

    def earlier_key(self) -> str:
        """The :func:`~nuclick_wsi.store.rerun.final_key` of this piece in the earlier run."""
        return final_key(self.earlier or self.signature, self.label)

    def box(self) -> Box:
        return self.piece.box


def overlapping_pairs(a: np.ndarray, b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of boxes ``a[i]`` and ``b[j]`` (rows x0, y0, x1, y1, end exclusive) sharing a
    pixel; ``b`` None: pairs within ``a``, each once (i < j)."""
    other = a if b is None else b
    if not len(a) or not len(other):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # two boxes share a pixel only if their centres lie closer than the larger side, per axis
    reach = float(max((a[:, 2:] - a[:, :2]).max(), (other[:, 2:] - other[:, :2]).max()))
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (other[:, :2] + other[:, 2:]) / 2
    if b is None:
        pairs = cKDTree(ca).query_pairs(reach, p=np.inf, output_type="ndarray").reshape(-1, 2)
        i, j = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    else:
        near = cKDTree(cb).query_ball_point(ca, reach, p=np.inf)
        i = np.repeat(np.arange(len(a)), [len(n) for n in near]).astype(np.int64)
        j = np.fromiter((k for n in near for k in n), np.int64, count=len(i))
    keep = (a[i, 0] < other[j, 2]) & (other[j, 0] < a[i, 2]) & (a[i, 1] < other[j, 3]) & (other[j, 1] < a[i, 3])
    return i[keep], j[keep]


@dataclass
class Plan:
    """What a rerun stitches again and what it takes."""

    restitch: list[bool | None]  #: per entry: stitch it (True), take its earlier final instance (False), None: no piece
    clear: np.ndarray  #: earlier labels whose pixels go (sorted uint32): gone or re-stitched instances
    dirty_chunks: set[tuple[int, int]]  #: level-0 chunks holding pixels of a cleared label

    @property
    def taken(self) -> int:
        """Pieces taken without stitching."""
        return self.restitch.count(False)


def plan(entries: list[Entry], earlier_pieces: dict[str, PackedPiece], finals: dict[str, tuple],
         chunk: int) -> Plan:
    """Which entries to stitch again (see the module's notes), given the earlier run's pieces by
    signature and its final instances by :func:`~nuclick_wsi.store.rerun.final_key`."""
    stitched = [k for k, e in enumerate(entries) if e.piece is not None]
    keys = [entries[k].earlier_key() for k in stitched]  # the earlier run's keys of the same pieces
    boxes = np.array([entries[k].box() for k in stitched], np.int64).reshape(-1, 4)
    kept = set(keys)
    gone = [k for k in finals if k not in kept]
    # read_state checked that every final names a piece that gave an instance
    gone_boxes = np.array([earlier_pieces[split_final_key(key)[0]].box for key in gone], np.int64).reshape(-1, 4)
    dirty = np.array([entries[k].new or key not in finals for k, key in zip(stitched, keys)], bool)
    dirty[overlapping_pairs(boxes, gone_boxes)[0]] = True
    i, j = overlapping_pairs(boxes)
    n = len(stitched)
    _, comp = connected_components(coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)), directed=False)
    again = np.isin(comp, comp[dirty])
    restitch: list[bool | None] = [None] * len(entries)
    for k, flag in zip(stitched, again.tolist()):
        restitch[k] = flag
    cleared_boxes = [b for key, b in zip(gone, gone_boxes.tolist()) if finals[key]]
    labels = [int(split_final_key(key)[1]) for key in gone if finals[key]]
    for k, key, flag in zip(stitched, keys, again.tolist()):
        if flag and finals.get(key):  # re-stitched: its earlier pixels go, its new ones are painted
            cleared_boxes.append(entries[k].box())
            labels.append(entries[k].label)
    chunks: set[tuple[int, int]] = set()
    for x0, y0, x1, y1 in cleared_boxes:
        for cy in range(max(y0, 0) // chunk, (y1 - 1) // chunk + 1):
            for cx in range(max(x0, 0) // chunk, (x1 - 1) // chunk + 1):
                chunks.add((cy, cx))
    return Plan(restitch, np.unique(np.array(labels, np.uint32)), chunks)


class MergedChunks:
    """The level-0 chunk writer of a rerun that stitches only some instances: each chunk is the earlier
    store's chunk with ``clear`` labels removed and the re-stitched instances painted over it.

    ``store``: the new label store (its ``chunk_bounds``, ``chunk_grid`` and ``copy_chunk`` are used);
    ``earlier``: the earlier store's level 0 (read-only zarr array); ``earlier_keys``: its stored
    chunks; ``write``: the new store's chunk writer.
    """

    def __init__(self, store, earlier, earlier_keys: Iterable[tuple[int, int]], clear: np.ndarray,
                 write: Callable[[int, int, np.ndarray], None]) -> None:
        self.store, self.earlier, self.clear, self.write = store, earlier, clear, write
        self.earlier_keys = set(earlier_keys)
        self.done: set[tuple[int, int]] = set()

    def _old(self, cy: int, cx: int) -> np.ndarray:
        x0, y0, x1, y1 = self.store.chunk_bounds(cy, cx)
        if (cy, cx) not in self.earlier_keys:
            return np.zeros((y1 - y0, x1 - x0), np.uint32)
        block = np.array(self.earlier[y0:y1, x0:x1], np.uint32)
        if self.clear.size:
            block[np.isin(block, self.clear, kind="table")] = 0
        return block

    def __call__(self, cy: int, cx: int, block: np.ndarray) -> None:
        """The stitcher's chunk (re-stitched instances only)."""
        merged = self._old(cy, cx)
        new = block != 0
        merged[new] = block[new]
        self.write(cy, cx, merged)
        self.done.add((cy, cx))

    def finish(self, dirty: set[tuple[int, int]]) -> None:
        """Write the chunks the stitcher did not: cleared ones anew, the others copied."""
        n_cy, n_cx = self.store.chunk_grid
        for cy, cx in sorted(k for k in dirty - self.done if k[0] < n_cy and k[1] < n_cx):
            self.write(cy, cx, self._old(cy, cx))
        for cy, cx in sorted(self.earlier_keys - self.done - dirty):
            if not self.store.copy_chunk(cy, cx):
                raise NuclickError(f"{self.store.ledger.earlier.path}: chunk ({cy}, {cx}) changed during the rerun; "
                                   "run again")
