"""Pixel conversion (nuclick_wsi.io.slides.pixels): transparency composited on white, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from nuclick_wsi.io.slides.pixels import composite_on_white


def reference(rgba: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Over white, rounded half up, in exact integers: (c * a + 255 * (255 - a)) / 255."""
    a = rgba[..., 3:].astype(np.int64)
    c = rgba[..., :3].astype(np.int64) * (255 if premultiplied else a)
    return np.minimum((c + 255 * (255 - a) + 127) // 255, 255).astype(np.uint8)


@pytest.mark.parametrize("see_through", [0.0, 0.003, 0.2, 0.3, 0.9, 1.0])  # both paths: few and many non-opaque
@pytest.mark.parametrize("premultiplied", [False, True])
def test_composite_on_white_equals_the_formula_whatever_the_share_of_transparency(see_through, premultiplied):
    rng = np.random.default_rng(int(see_through * 1000))
    rgba = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((64, 48)) < see_through, rng.integers(0, 255, (64, 48)), 255)
    if premultiplied:  # a premultiplied sample never exceeds its alpha
        rgba[..., :3] = np.minimum(rgba[..., :3], rgba[..., 3:])
    got = composite_on_white(rgba, premultiplied)
    assert got.dtype == np.uint8 and got.shape == (64, 48, 3)
    np.testing.assert_array_equal(got, reference(rgba, premultiplied))
    opaque = rgba[..., 3] == 255
    np.testing.assert_array_equal(got[opaque], rgba[..., :3][opaque])  # opaque pixels keep their samples
    assert (got[rgba[..., 3] == 0] == 255).all()  # fully transparent: white


def test_composite_on_white_returns_a_new_array():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    out = composite_on_white(rgba)
    out[0, 0] = 0
    assert rgba[0, 0, 0] == 255
