"""Proposals over a slide: tile seams, the ROI filter, the tissue mask (stand-in detector, generated slides)."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import box

from nuclick_wsi.detection.peaks import heatmap_peaks, match_distance, match_inside, nms_points
from nuclick_wsi.detection.slide import DetectOptions, TileGrid, detect_slide, tiles_to_run
from nuclick_wsi.detection.tissue import tissue_mask
from nuclick_wsi.io.slides.registry import open_slide
from tests.helpers import spot_detector, spot_slide_rgb, write_tiff_slide

#: tile 128, overlap 16 detector px: cores 96 detector px = 192 level-0 px at 0.25 um/px (detector 0.5)
OPTS = dict(tile=128, overlap=16, batch_size=3, progress=False, device="cpu", precision="fp32")
SEAM = 192


def run(tmp_path, spots, *, tissue=None, roi=None, size=(1600, 1200), **kw):
    rgb = spot_slide_rgb(*size, spots, tissue=tissue)
    path = write_tiff_slide(tmp_path / "s.tif", size[0], size[1], 0.25, rgb=rgb)
    with open_slide(path) as slide:
        return detect_slide(slide, spot_detector(), 0.25, options=DetectOptions(**{**OPTS, **kw}), roi=roi)


def test_cores_partition_the_slide():
    grid = TileGrid(1000, 700, 128, 16, 2.0)
    rows, cols = grid.shape()
    owners = np.zeros((700, 1000), int)
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = grid.core(r, c)
            owners[max(int(y0), 0) if y0 > -np.inf else 0:int(min(y1, 700)),
                   max(int(x0), 0) if x0 > -np.inf else 0:int(min(x1, 1000))] += 1
            ox, oy = grid.origin(r, c)
            assert ox <= max(x0, 0) - 16 or x0 == -np.inf  # a core has its overlap of context around it
    assert (owners == 1).all()


def test_nucleus_on_a_seam_is_proposed_once(tmp_path):
    # on a vertical seam, a horizontal seam, a corner where four tiles meet, and one pixel either side
    spots = [(SEAM, 100), (400, SEAM * 2), (SEAM * 3, SEAM * 3), (SEAM * 2 - 1, 700), (SEAM * 2 + 1, 900),
             (1000, 1000)]
    found = run(tmp_path, spots)
    assert len(found.xy) == len(spots)
    m = match_distance(found.xy, np.asarray(spots, float), 3.0)
    assert m["tp"] == len(spots), (found.xy, spots)


def test_without_the_seam_rule_a_seam_nucleus_comes_twice(tmp_path):
    """The control: both tiles that see the seam find the spot (so the rule above is what makes it once)."""
    from nuclick_wsi.detection.predict import heatmaps
    import torch

    rgb = spot_slide_rgb(512, 256, [(SEAM, 100)])
    net = spot_detector().net
    left = rgb[::2, ::2][:, 0:128]
    right = rgb[::2, ::2][:, 80:208]
    for part in (left, right):
        prob = heatmaps(net, np.ascontiguousarray(part)[None], torch.device("cpu"), None)[0]
        assert len(heatmap_peaks(prob, 0.5)[0]) == 1


def test_roi_limits_tiles_and_proposals(tmp_path):
    spots = [(300, 300), (350, 900), (1200, 300), (1300, 1000)]
    roi = box(0, 0, 800, 1200)  # the left half
    everything = run(tmp_path, spots)
    inside = run(tmp_path, spots, roi=roi)
    assert len(everything.xy) == 4
    assert len(inside.xy) == 2 and (inside.xy[:, 0] < 800).all()
    assert inside.tiles < everything.tiles
    assert inside.tissue_px0 == pytest.approx(800 * 1200)  # the ROI replaces the tissue mask


def test_roi_replaces_the_tissue_mask(tmp_path):
    """Areas the user drew are searched even where the tissue mask sees glass (pale tissue)."""
    spots = [(300, 300), (1200, 900)]
    found = run(tmp_path, spots, tissue=[(1000, 700, 1500, 1100)], roi=box(100, 100, 600, 600))
    assert len(found.xy) == 1 and abs(found.xy[0, 0] - 300) < 3


def test_only_tissue_tiles_are_read(tmp_path):
    tissue = [(100, 100, 600, 500)]
    spots = [(300, 300), (1400, 1000)]  # the second lies on glass, far from the tissue
    found = run(tmp_path, spots, tissue=tissue)
    assert len(found.xy) == 1 and abs(found.xy[0, 0] - 300) < 3
    rows, cols = TileGrid(800, 600, 128, 16, 2.0).shape()
    assert found.tiles < rows * cols / 2


def test_tissue_mask_on_a_generated_slide(tmp_path):
    w, h = 4096, 3072
    tissue = [(400, 400, 1600, 1400), (2400, 1600, 3800, 2900)]
    rgb = spot_slide_rgb(w, h, [(800, 800), (3000, 2000)], tissue=tissue)
    rgb[600:700, 600:700] = 250  # a small hole inside the first piece: filled
    rgb[2000:2010, 200:210] = (235, 190, 215)  # a speck on the glass: dropped
    path = write_tiff_slide(tmp_path / "t.tif", w, h, 0.25, rgb=rgb)
    with open_slide(path) as slide:
        tm = tissue_mask(slide, 0.25, mask_mpp=8.0)
    assert tm.downsample == 32 and tm.mask.shape == (96, 128)
    truth = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in tissue:
        truth[y0:y1, x0:x1] = True
    truth = truth[16::32, 16::32]
    iou = (tm.mask & truth).sum() / (tm.mask | truth).sum()
    assert iou > 0.95
    assert tm.mask[650 // 32, 650 // 32]  # the hole is filled
    assert not tm.mask[2005 // 32, 205 // 32]  # the speck is gone
    assert tm.area_px0() == pytest.approx(truth.sum() * 32 ** 2, rel=0.05)


def test_tissue_mask_keeps_a_slide_that_is_all_tissue(tmp_path):
    rgb = spot_slide_rgb(1024, 1024, [], tissue=[(0, 0, 1024, 512)])
    rgb[512:] = (200, 120, 190)  # two tissue colours, no glass: Otsu would split them
    path = write_tiff_slide(tmp_path / "a.tif", 1024, 1024, 0.25, rgb=rgb)
    with open_slide(path) as slide:
        assert tissue_mask(slide, 0.25).mask.all()


def test_tiles_to_run_without_tissue_or_roi_is_every_tile():
    grid = TileGrid(500, 300, 128, 16, 1.0)
    assert len(tiles_to_run(grid, None)) == grid.shape()[0] * grid.shape()[1]


def test_peaks_nms_and_matching():
    prob = np.zeros((20, 20), np.float32)
    prob[5, 5], prob[5, 6], prob[15, 10] = 0.9, 0.8, 0.6
    xy, s = heatmap_peaks(prob, 0.5, min_distance=2, stride=2)
    assert len(xy) == 2 and s[0] == pytest.approx(0.9)
    assert 11 < xy[0, 0] < 12.5 and xy[0, 1] == pytest.approx(11.0)  # pulled towards the 0.8 neighbour
    keep = nms_points(np.array([[0, 0], [1, 0], [10, 0]], float), np.array([0.5, 0.9, 0.7]), 2.0)
    assert keep.tolist() == [1, 2]
    labels = np.zeros((10, 10), int)
    labels[1:4, 1:4], labels[6:9, 6:9] = 1, 2
    m = match_inside(np.array([[2.5, 2.5], [2.0, 2.0], [5.0, 5.0]]), labels)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
