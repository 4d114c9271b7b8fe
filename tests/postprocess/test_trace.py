"""Tests of nuclick_wsi.postprocess.trace: exact pixel-edge tracing, rasterisation, deterministic ids."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from skimage.draw import ellipse

from nuclick_wsi.postprocess.trace import (
    NUCLICK_NAMESPACE,
    deterministic_uuid,
    mask_rectangles,
    rasterize,
    trace_mask,
)


def _polygons(geom):
    return [geom] if isinstance(geom, Polygon) else list(geom.geoms)


def _rings(geom):
    for poly in _polygons(geom):
        yield poly.exterior
        yield from poly.interiors


def _check_trace(mask: np.ndarray, x0: int = 0, y0: int = 0):
    """Trace, then check every promise of trace_mask; return the geometry."""
    geom = trace_mask(mask, x0, y0)
    assert isinstance(geom, (Polygon, MultiPolygon))
    assert geom.is_valid, shapely.is_valid_reason(geom)
    h, w = mask.shape
    np.testing.assert_array_equal(rasterize(geom, x0, y0, w, h), mask)
    assert geom.area == mask.sum()
    for ring in _rings(geom):
        pts = np.asarray(ring.coords)
        assert np.array_equal(pts, np.round(pts)), "vertices at integer pixel corners"
        assert np.array_equal(pts[0], pts[-1])
        body = pts[:-1]
        assert len(np.unique(body, axis=0)) == len(body), "no repeated vertices"
        prev_edge = body - np.roll(body, 1, axis=0)
        next_edge = np.roll(body, -1, axis=0) - body
        cross = prev_edge[:, 0] * next_edge[:, 1] - prev_edge[:, 1] * next_edge[:, 0]
        assert np.all(cross != 0), "no collinear vertices"
    for poly in _polygons(geom):
        assert poly.exterior.is_ccw
        assert not any(r.is_ccw for r in poly.interiors)
    return geom


def _blob(rng: np.random.Generator, size: int = 34) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = ellipse(
        size / 2, size / 2, rng.uniform(3, size / 2.2), rng.uniform(3, size / 2.2),
        shape=mask.shape, rotation=rng.uniform(0, np.pi),
    )
    mask[rr, cc] = True
    return mask


def test_single_pixel():
    mask = np.ones((1, 1), dtype=bool)
    geom = _check_trace(mask, 10, 20)
    assert geom.equals(box(10, 20, 11, 21))
    assert len(geom.exterior.coords) == 5


def test_rectangle_has_four_corners():
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:5, 2:6] = True
    geom = _check_trace(mask, 100, 200)
    assert geom.equals(box(102, 201, 106, 205))
    assert len(geom.exterior.coords) == 5


def test_empty_mask_gives_empty_polygon():
    geom = trace_mask(np.zeros((4, 4), dtype=bool))
    assert geom.is_empty
    assert not rasterize(geom, 0, 0, 4, 4).any()


def test_random_blobs_round_trip():
    rng = np.random.default_rng(1)
    for i in range(40):
        mask = _blob(rng)
        geom = _check_trace(mask, int(rng.integers(0, 10**5)), int(rng.integers(0, 10**5)))
        assert isinstance(geom, Polygon)


def test_holes_are_interior_rings():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:11, 1:11] = True
    mask[3:5, 3:5] = False
    mask[6:9, 5:7] = False
    geom = _check_trace(mask, 5, 7)
    assert isinstance(geom, Polygon)
    assert len(geom.interiors) == 2


def test_diagonal_pixels_become_touching_parts():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    geom = _check_trace(mask)
    assert isinstance(geom, MultiPolygon)
    assert len(geom.geoms) == 2
    a, b = geom.geoms
    assert a.intersection(b).equals(shapely.Point(1, 1))


def test_hole_touching_outline_at_a_corner():
    mask = np.array(
        [
            [1, 1, 1, 0],
            [1, 0, 1, 0],
            [1, 1, 0, 1],
            [0, 0, 1, 1],
        ],
        dtype=bool,
    )
    _check_trace(mask, 3, 4)


def test_random_noise_round_trip():
    """Salt-and-pepper masks: many diagonal contacts, holes touching shells, single pixels."""
    rng = np.random.default_rng(2)
    for p in (0.2, 0.5, 0.8):
        for _ in range(5):
            _check_trace(rng.random((20, 23)) < p, int(rng.integers(0, 1000)), int(rng.integers(0, 1000)))


def test_blob_with_random_holes_round_trip():
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = _blob(rng, 40) & (rng.random((40, 40)) > 0.1)
        _check_trace(mask, 7, 9)


def test_mask_rectangles_cover_mask_exactly():
    rng = np.random.default_rng(4)
    mask = rng.random((15, 17)) < 0.5
    x0, y0, x1, y1 = mask_rectangles(mask)
    cover = np.zeros(mask.shape, dtype=int)
    for a, b, c, d in zip(x0, y0, x1, y1):
        cover[b:d, a:c] += 1
    np.testing.assert_array_equal(cover, mask.astype(int))


def test_mask_rectangles_merges_identical_rows():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 3:6] = True
    assert len(mask_rectangles(mask)[0]) == 1


def test_trace_rejects_non_2d():
    with pytest.raises(ValueError):
        trace_mask(np.ones((2, 2, 2), dtype=bool))


def test_rasterize_window_and_clipping():
    geom = box(10, 20, 13, 22)
    out = rasterize(geom, 11, 19, 5, 5)
    expected = np.zeros((5, 5), dtype=bool)
    expected[1:3, 0:2] = True
    np.testing.assert_array_equal(out, expected)
    assert not rasterize(geom, 100, 100, 4, 4).any()


def test_rasterize_uses_pixel_centres():
    # a triangle covering the centre of pixel (0, 0) only
    tri = Polygon([(0, 0), (1, 0), (0, 1)])
    np.testing.assert_array_equal(rasterize(tri, 0, 0, 2, 2), [[False, False], [False, False]])
    tri = Polygon([(0, 0), (1.2, 0), (0, 1.2)])
    np.testing.assert_array_equal(rasterize(tri, 0, 0, 2, 2), [[True, False], [False, False]])


def test_uuid_is_deterministic_and_distinct():
    a = deterministic_uuid("slide1.svs", 3, 10.5, 20.25, "nucleus")
    assert a == deterministic_uuid("slide1.svs", 3, 10.5, 20.25, "nucleus")
    assert uuid.UUID(a).version == 5
    others = {
        deterministic_uuid("slide2.svs", 3, 10.5, 20.25, "nucleus"),
        deterministic_uuid("slide1.svs", 4, 10.5, 20.25, "nucleus"),
        deterministic_uuid("slide1.svs", 3, 11.5, 20.25, "nucleus"),
        deterministic_uuid("slide1.svs", 3, 10.5, 21.25, "nucleus"),
        deterministic_uuid("slide1.svs", 3, 10.5, 20.25, "gland"),
    }
    assert a not in others and len(others) == 5


def test_uuid_ignores_float_noise_and_numpy_types():
    a = deterministic_uuid("s", 0, 10.5, 20.25, "nucleus")
    assert deterministic_uuid("s", np.int64(0), np.float64(10.5), np.float32(20.25), "nucleus") == a
    assert deterministic_uuid("s", 0, 10.5 + 1e-9, 20.25 - 1e-9, "nucleus") == a
    assert deterministic_uuid("s", 0, -0.0, 0.0, "nucleus") == deterministic_uuid("s", 0, 0.0, 0.0, "nucleus")


def test_uuid_value_is_pinned():
    """The namespace and the name format must never change: reruns rely on equal ids."""
    assert NUCLICK_NAMESPACE == uuid.uuid5(uuid.NAMESPACE_URL, "https://nuclick-wsi/instance")
    assert deterministic_uuid("slide1.svs", 3, 10.5, 20.25, "nucleus") == str(
        uuid.uuid5(NUCLICK_NAMESPACE, "slide1.svs\x1f3\x1f10.500\x1f20.250\x1fnucleus")
    )
