"""Training tiles read by region from a slide + outlines: pixel-exact labels, ROI, valid mask, bounded reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.annotations import read_qupath_polygons
from nuclick_wsi.io.datasets import ids_inside
from nuclick_wsi.io.slides import open_slide
from nuclick_wsi.training.regions import iter_region_tiles, read_outlines, read_roi, slide_tiles
from tests.helpers import RecordingSource, blob_slide, canonical_labels, labels_at_pixel_centres, roi_file


@pytest.fixture
def blobs(tmp_path):
    return blob_slide(tmp_path)


def test_labels_equal_the_outlines_pixel_for_pixel_at_the_model_mpp(blobs):
    slide_path, outlines_path, _ = blobs
    polys = [p["geometry"] for p in read_qupath_polygons(outlines_path)]  # as written: 2 decimals
    outlines = read_outlines(outlines_path)
    assert outlines.classes[:2] == ["Stroma", "Tumor"] and len(outlines.geometries) == len(polys)
    with open_slide(slide_path) as slide:  # 0.5 um/px: the model's 0.25 um/px is 2x upsampled
        tiles = list(iter_region_tiles(slide, outlines, mpp=0.25, tile=128, margin=16))
    assert {t.scale for t in tiles} == {0.5} and all(t.image.shape == (160, 160, 3) for t in tiles)
    for t in tiles:
        x0, y0, _, _ = t.region
        want = labels_at_pixel_centres(polys, x0, y0, t.scale, t.labels.shape)
        assert np.array_equal(canonical_labels(t.labels), canonical_labels(want)), t.name
        # the image is read from the same region: nuclei are dark, background pink
        grey = t.image.mean(axis=2)
        assert grey[t.labels > 0].mean() < 110 < grey[(t.labels == 0) & (grey < 255)].mean()
    # every outline is in the core (valid part) of exactly one tile
    assert sum(len(ids_inside(t.labels, t.valid)) for t in tiles) == len(polys)


def test_region_reads_never_request_the_whole_slide(blobs):
    slide_path, outlines_path, _ = blobs
    rec = RecordingSource(open_slide(slide_path))
    tiles = list(iter_region_tiles(rec, read_outlines(outlines_path), mpp=0.25, tile=128, margin=16))
    assert len(rec.sizes) == len(tiles) > 4
    assert all(w == h == 160 * 0.5 for w, h in rec.sizes)  # (tile + 2 margin) model px, nothing more
    assert max(w * h for w, h in rec.sizes) < 0.05 * rec.width * rec.height


def test_roi_limits_tiles_and_valid_mask(blobs, tmp_path):
    slide_path, outlines_path, _ = blobs
    polys = [p["geometry"] for p in read_qupath_polygons(outlines_path)]
    roi = box(100, 80, 260, 200)
    area = read_roi(roi_file(tmp_path / "roi.geojson", roi))
    assert area.equals(roi)
    rec = RecordingSource(open_slide(slide_path))
    tiles = list(iter_region_tiles(rec, read_outlines(outlines_path), mpp=0.25, tile=128, roi=area))
    step = 128 * 0.5
    # exactly the grid cells of 64 level-0 px meeting the ROI: columns 1..4, rows 1..3
    assert sorted(t.name for t in tiles) == sorted(f"blobs_x{int(c * step)}_y{int(r * step)}"
                                                     for c in range(1, 5) for r in range(1, 4))
    for t in tiles:
        x0, y0, _, _ = t.region
        want = labels_at_pixel_centres([roi], x0, y0, t.scale, t.valid.shape) > 0
        assert np.array_equal(t.valid, want)
        # labels hold every outline, in or out of the ROI: valid says where absence means background
        assert np.array_equal(t.labels > 0, labels_at_pixel_centres(polys, x0, y0, t.scale, t.labels.shape) > 0)


def test_without_roi_valid_is_the_outlines_grown(blobs):
    slide_path, outlines_path, _ = blobs
    with open_slide(slide_path) as slide:
        t = next(iter_region_tiles(slide, read_outlines(outlines_path), mpp=0.25, tile=128, grow_um=2.0))
    assert t.valid[t.labels > 0].all()
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(t.labels == 0)
    assert not t.valid[dist > 8.01].any() and t.valid[(dist > 0) & (dist <= 8)].all()  # 2 um = 8 px at 0.25


def test_slide_tiles_click_each_outline_once_and_only_inside_the_roi(blobs, tmp_path):
    slide_path, outlines_path, polys = blobs
    tiles = slide_tiles(str(slide_path), str(outlines_path), mpp=0.25, patch=64, tile=256, log=lambda m: None)
    assert sum(len(t.targets) for t in tiles) == len(polys)
    roi = box(0, 0, 350, 520)
    left = slide_tiles(str(slide_path), str(outlines_path), mpp=0.25, patch=64, tile=256,
                       roi=str(roi_file(tmp_path / "left.geojson", roi)),
                       log=lambda m: None)
    n_left = sum(p.centroid.x < 350 for p in polys)
    assert sum(len(t.targets) for t in left) == n_left < len(polys)


def test_errors_are_one_line_and_name_the_file(tmp_path, blobs):
    slide_path, _, _ = blobs
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(NuclickError, match=r"empty\.geojson: no features") as e:
        read_outlines(empty)
    assert "\n" not in str(e.value)
    line = tmp_path / "line.geojson"
    line.write_text(json.dumps({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[5, 5], [9, 9]]}}))
    with pytest.raises(NuclickError, match=r"line\.geojson: no outlines \(polygons\) or points"):
        read_outlines(line)
    with pytest.raises(NuclickError, match=r"line\.geojson: --roi file has no area annotations"):
        read_roi(line)
    xml = tmp_path / "a.xml"
    xml.write_text('<ASAP_Annotations><Annotations/></ASAP_Annotations>')
    with pytest.raises(NuclickError, match=r"a\.xml: training reads QuPath GeoJSON"):
        read_outlines(xml)
    with pytest.raises(NuclickError, match=r"empty\.geojson: no features"):
        read_roi(empty)
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}}))
    with pytest.raises(NuclickError, match=r"points\.geojson: no outlines \(polygons\) to learn from"):
        slide_tiles(str(slide_path), str(points), mpp=0.25, patch=64)
