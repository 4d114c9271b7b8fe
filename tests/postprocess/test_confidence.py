"""Outline confidence: high where the probability map is the mask, lower as it spreads or fades."""

from __future__ import annotations

import numpy as np
import pytest

from nuclick_wsi.postprocess.confidence import outline_confidence


def disk(n: int, r: float, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def crop(mask: np.ndarray):
    rr, cc = np.nonzero(mask)
    r0, c0 = rr.min(), cc.min()
    return mask[r0:rr.max() + 1, c0:cc.max() + 1], (int(r0), int(c0))


def test_crisp_map_is_fully_confident():
    m = disk(64, 10, 32, 32)
    mask, where = crop(m)
    assert outline_confidence(m.astype(np.float32), mask, where, 6) == pytest.approx(1.0)


def test_halo_and_faint_inside_lower_confidence():
    m = disk(64, 10, 32, 32)
    mask, where = crop(m)
    halo = m.astype(np.float32) + 0.4 * (disk(64, 14, 32, 32) & ~m)  # half-probable ring where the edge could be
    faint = np.where(m, 0.6, 0.0).astype(np.float32)
    crisp = outline_confidence(m.astype(np.float32), mask, where, 6)
    assert outline_confidence(halo, mask, where, 6) < crisp - 0.2
    assert outline_confidence(faint, mask, where, 6) == pytest.approx(0.6)


def test_only_the_ring_counts_and_edges_of_the_patch_are_safe():
    m = disk(64, 10, 32, 32)
    mask, where = crop(m)
    far = m.astype(np.float32)
    far[:5, :5] = 1.0  # probability far away (another nucleus) does not count
    assert outline_confidence(far, mask, where, 6) == pytest.approx(1.0)
    edge = disk(64, 10, 2, 2)  # an instance at the patch corner: the ring is clipped, no error
    mask, where = crop(edge)
    assert 0.0 < outline_confidence(edge.astype(np.float32), mask, where, 6) <= 1.0
