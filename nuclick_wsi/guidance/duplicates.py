"""Duplicate clicks in O(n) memory: a grid of cells one duplicate radius wide.

Two clicks within ``radius`` lie in the same or in neighbouring cells, so each click is compared with
the clicks of its 3 x 3 cells only, and only clicks whose neighbourhood holds another click are looked
at one by one. The rule is the one ``segment`` always had: clicks in input order; a click not yet
marked keeps its place and marks every later unmarked click within ``radius`` as its duplicate.
Memory is a few arrays of n numbers whatever the clustering (10^5 clicks at one spot included);
a pair list (``cKDTree.query_pairs``) grew with the square of the clicks in one spot.
"""

from __future__ import annotations

import numpy as np

_OFFSETS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def duplicate_of(xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    """For each click, the index of the earlier click it duplicates (within ``radius``), else -1.

    ``xs`` and ``ys`` must be finite. Equal to pairing every two clicks within ``radius`` (Euclidean,
    distance <= radius) and marking the later of each pair whose clicks are both unmarked, in pair order.
    """
    xs = np.asarray(xs, float)
    ys = np.asarray(ys, float)
    n = len(xs)
    of = np.full(n, -1, np.int64)
    if n < 2 or not radius > 0:
        return of
    # cells at least one radius wide (wider over a huge range, so that cells number within int64):
    # a click's duplicates lie in its own or the 8 neighbouring cells either way
    cell = max(float(radius), float(max(np.ptp(xs), np.ptp(ys))) / 2**30)
    cx = np.floor((xs - xs.min()) / cell).astype(np.int64)
    cy = np.floor((ys - ys.min()) / cell).astype(np.int64)
    width = int(cy.max()) + 3
    code = (cx + 1) * width + (cy + 1)
    order = np.lexsort((np.arange(n), code))  # by cell, then by index
    scode = code[order]
    first = np.flatnonzero(np.r_[True, scode[1:] != scode[:-1]])
    ucode = scode[first]
    last = np.r_[first[1:], n]
    count = np.empty(n, np.int64)
    count[order] = np.repeat(last - first, last - first)
    steps = np.array([dx * width + dy for dx, dy in _OFFSETS], np.int64)
    crowded = count > 1
    for step in steps[steps != 0]:
        pos = np.minimum(np.searchsorted(ucode, code + step), len(ucode) - 1)
        crowded |= ucode[pos] == code + step
    r2 = float(radius) ** 2
    for i in np.flatnonzero(crowded):
        if of[i] >= 0:
            continue
        want = code[i] + steps
        pos = np.minimum(np.searchsorted(ucode, want), len(ucode) - 1)
        for k in pos[ucode[pos] == want]:
            idx = order[first[k]:last[k]]
            idx = idx[idx > i]  # the cell's clicks are in index order
            idx = idx[of[idx] < 0]
            if len(idx):
                near = (xs[idx] - xs[i]) ** 2 + (ys[idx] - ys[i]) ** 2 <= r2
                of[idx[near]] = i
    return of
