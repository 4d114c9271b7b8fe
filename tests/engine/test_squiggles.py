"""Glands from squiggles: the squiggle sampler, patch geometry, holes, exclusion, end to end, training.

Pipeline tests use a stand-in gland network that marks dark tissue (pixelwise, so the expected
mask is the drawn gland itself, computed here independently); the training test learns synthetic
textured glands, some with a lumen (a hole).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage as ndi
from shapely.geometry import shape
from skimage import draw
from torch import nn

from tests.helpers import disk_model, write_tiff_slide
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.errors import ModelError, NuclickError
from nuclick_wsi.postprocess.trace import rasterize
from nuclick_wsi.engine.squiggles import SquiggleStrategy
from nuclick_wsi.guidance.squiggles import CONTEXT, MIN_CONTEXT, guidance_maps, polyline_pixels, squiggle_box
from nuclick_wsi.model.weights import POSTPROCESS_DEFAULTS, LoadedModel
from nuclick_wsi.pipeline import Models, SegmentOptions, predict_gland_labels, segment
from nuclick_wsi.records import Prompts, Squiggle
from nuclick_wsi.io.slides.memory import array_source
from nuclick_wsi.store.instances import read_instance_table
from nuclick_wsi.store.labels import open_labels
from nuclick_wsi.io.datasets import Tile, find_pairs, load_tile
from nuclick_wsi.training.squiggles import (GlandSampler, gland_distance, make_gland_batch, sample_squiggle,
                                            squiggle_threshold_range)

STROMA, EPITHELIUM, LUMEN = (228, 182, 205), (125, 70, 150), (245, 238, 242)


# --------------------------------------------------------------------------------------------
# synthetic glands and a stand-in gland model


def ellipse(shape_hw, cy, cx, ry, rx, rotation=0.0) -> np.ndarray:
    m = np.zeros(shape_hw, bool)
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape_hw, rotation=rotation)
    m[rr, cc] = True
    return m


def paint(labels: np.ndarray, texture: float = 0.0, seed: int = 0) -> np.ndarray:
    """RGB of a label image: stroma, epithelium (label > 0), lumen (holes of glands), textured."""
    rng = np.random.default_rng(seed)
    glands = labels > 0
    lumen = np.zeros_like(glands)
    for i in np.unique(labels)[1:]:
        g = labels == i
        lumen |= ndi.binary_fill_holes(g) & ~g
    rgb = np.empty((*labels.shape, 3), np.float32)
    rgb[:] = STROMA
    rgb[glands] = EPITHELIUM
    rgb[lumen] = LUMEN
    if texture:
        tex = ndi.gaussian_filter(rng.normal(0, 1, labels.shape), 2)
        rgb += (tex / tex.std())[..., None] * texture
        dots = ndi.binary_dilation((rng.random(labels.shape) < 0.01) & glands, iterations=2)
        rgb[dots] -= 40
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def random_glands(size: int, n: int, seed: int, axes=(30, 70), hole_every: int = 2) -> np.ndarray:
    """Non-touching elliptic glands; every ``hole_every``-th has a lumen."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    placed = tries = 0
    while placed < n and tries < 5000:
        tries += 1
        a = rng.uniform(*axes)
        b = rng.uniform(*axes) * rng.uniform(0.6, 1.0)
        ang = rng.uniform(0, math.pi)
        cy, cx = rng.uniform(a + 4, size - a - 4, 2)
        g = ellipse(labels.shape, cy, cx, a, b, ang)
        if (ndi.binary_dilation(g, iterations=8) & (labels > 0)).any():
            continue
        if placed % hole_every == 0:
            g &= ~ellipse(labels.shape, cy, cx, a * 0.5, b * 0.5, ang)
        placed += 1
        labels[g] = placed
    return labels


class DarkGlandNet(nn.Module):
    """Stand-in gland network: logit 40 * (0.6 - mean RGB), i.e. epithelium on, stroma and lumen off."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (0.6 - x[:, :3].mean(dim=1, keepdim=True)) + self.dummy


def dark_gland_model(mpp: float = 0.5, patch: int = 512, **post) -> LoadedModel:
    meta = {"mpp": mpp, "patch_size": patch, "task": "gland",
            "postprocess": {**POSTPROCESS_DEFAULTS["gland"], **post}}
    return LoadedModel(net=DarkGlandNet().eval(), arch="test-dark-gland", arch_args={}, metadata=meta,
                       source="test:dark-gland")


class RecordingSlide:
    """Wraps a slide source and records every read_region call."""

    def __init__(self, inner) -> None:
        self.inner, self.reads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_region(self, x, y, w, h, ow, oh):
        self.reads.append((x, y, w, h, ow, oh))
        return self.inner.read_region(x, y, w, h, ow, oh)


# the slide of the pipeline tests (level-0 px at 0.5 um/px): a ring gland (lumen = hole), a solid gland,
# and a long gland whose squiggle's box exceeds 512 px (downscaled)
H, W = 900, 1300
RING = dict(cy=260, cx=300, ry=80, rx=110)
SOLID = dict(cy=250, cx=800, ry=60, rx=90)
LONG = dict(cy=650, cx=650, ry=70, rx=420)
SQUIGGLES = [
    [(300 + 80 * math.cos(t), 260 + 57 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40)],  # round the lumen
    [(760.5, 250.5), (800.5, 240.5), (840.5, 255.5)],
    [(300.5, 650.5), (500.5, 655.5), (800.5, 645.5), (1000.5, 650.5)],
]


def gland_truth() -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((H, W), np.int32)
    ring = ellipse((H, W), **RING) & ~ellipse((H, W), RING["cy"], RING["cx"], 36, 50)
    labels[ring] = 1
    labels[ellipse((H, W), **SOLID)] = 2
    labels[ellipse((H, W), **LONG)] = 3
    return labels, paint(labels)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --------------------------------------------------------------------------------------------
# the squiggle sampler


def test_sample_squiggle_lies_inside_and_follows_the_threshold_rule():
    rng = np.random.default_rng(0)
    shape_hw = (200, 240)
    solid = ellipse(shape_hw, 100, 120, 60, 90, 0.4)
    ring = ellipse(shape_hw, 100, 120, 80, 100) & ~ellipse(shape_hw, 100, 120, 40, 50)
    for mask in (solid, ring):
        dist = gland_distance(mask)
        hi = squiggle_threshold_range(dist, mask)
        vals = dist[mask]
        assert hi == pytest.approx(vals.mean() + vals.std(), rel=1e-5)
        taus = []
        for _ in range(40):
            sq, tau = sample_squiggle(mask, rng, dist)
            taus.append(tau)
            assert 0 <= tau <= hi
            assert sq.any() and not (sq & ~mask).any()  # inside the gland
            assert not (sq & ~(dist > tau)).any()  # inside {D > tau}
            if mask is ring:  # the skeleton of a ring goes round the hole
                assert ndi.binary_fill_holes(sq)[100, 120]
        taus = np.array(taus)
        assert taus.min() < 0.25 * hi and taus.max() > 0.75 * hi  # uniform over [0, mu + sigma]
    # a fixed tau gives the morphological skeleton of {D > tau}
    from skimage.morphology import skeletonize

    dist = gland_distance(solid)
    sq, tau = sample_squiggle(solid, rng, dist, tau=10.0)
    assert tau == 10.0 and np.array_equal(sq, skeletonize(dist > 10.0))
    # a threshold above every distance falls back to the deepest pixels
    sq, _ = sample_squiggle(solid, rng, dist, tau=1e6)
    assert sq.any() and np.all(dist[sq] == dist.max())


def test_gland_sampler_patches_maps_and_exclusion():
    labels = random_glands(512, 5, seed=3)
    tile = Tile("t", paint(labels, texture=10), labels, np.unique(labels)[1:])
    sampler = GlandSampler([tile], patch=256, seed=0, exclusion_drop=0.0)
    assert len(sampler) == 5
    imgs, labs, incl, excl, targets, boxes = sampler.draw(12, jitter=False)
    assert imgs.shape == (12, 256, 256, 3) and labs.shape == incl.shape == excl.shape == (12, 256, 256)
    for k in range(12):
        target = labs[k] == targets[k]
        assert incl[k].any() and not (incl[k] & ~target).any()  # the squiggle lies in its gland
        others = set(np.unique(labs[k][excl[k]]).tolist())
        assert 0 not in others and targets[k] not in others  # exclusion pixels lie in other glands
        assert excl[k].sum() == len(others)  # one pixel per other gland
        ox, oy, side = boxes[k]
        assert side >= 256
        # every other gland whose inner half reaches the window is marked once
        window = sampler._labels[0][max(oy, 0):oy + side, max(ox, 0):ox + side]
        expected = set()
        for other in set(np.unique(window).tolist()) - {0, int(targets[k])}:
            _, _, rr, cc = sampler._glands[0][other]
            if ((rr >= oy) & (rr < oy + side) & (cc >= ox) & (cc < ox + side)).any():
                expected.add(other)
        assert others == expected
    x, g, go = make_gland_batch(sampler, 4)
    assert x.shape == (4, 5, 256, 256) and g.shape == go.shape == (4, 1, 256, 256)
    assert float(x[:, :3].min()) >= 0 and float(x[:, :3].max()) <= 1
    assert ((x[:, 3:4] > 0) & (g == 0)).sum() == 0  # flips and turns keep the squiggle inside its gland


def test_gland_sampler_small_box_is_native_large_box_is_downscaled():
    labels = np.zeros((900, 900), np.int32)
    labels[ellipse(labels.shape, 200, 200, 40, 60)] = 1  # small: box grown to the patch
    labels[ellipse(labels.shape, 600, 450, 60, 400)] = 2  # long: box larger than the patch
    tile = Tile("t", paint(labels), labels, np.array([1, 2]))
    sampler = GlandSampler([tile], patch=256, seed=0)
    rng = np.random.default_rng(1)
    _, labs, incl, _, _, boxes = sampler.draw(0, items=[(0, 1), (0, 2)], rng=rng, jitter=False)
    assert boxes[0][2] == 256  # native resolution
    assert boxes[1][2] > 256  # downscaled
    # the downscaled label patch is the gland shrunk by side / 256 (area ratio)
    f = boxes[1][2] / 256
    assert (labs[1] == 2).sum() == pytest.approx((labels == 2).sum() / f ** 2, rel=0.03)
    assert incl[1].any() and not (incl[1] & (labs[1] != 2)).any()


def test_glas_layout_is_read_as_instance_labels(tmp_path):
    from PIL import Image

    labels = random_glands(256, 3, seed=1, axes=(20, 40))
    Image.fromarray(paint(labels)).save(tmp_path / "train_1.bmp")
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "train_1_anno.bmp")
    pairs = find_pairs(tmp_path)
    assert [(p[0].name, p[1].name) for p in pairs] == [("train_1.bmp", "train_1_anno.bmp")]
    tile = load_tile(pairs[0][0], pairs[0][1], kind=pairs[0][2])
    assert np.array_equal(tile.labels, labels) and list(tile.targets) == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# patch geometry, guidance maps


def test_box_small_squiggle_is_grown_to_the_patch():
    pts = [(1000.5, 2000.5), (1060.5, 2030.5)]
    box = squiggle_box(pts, 1.0, 512)
    assert box.side == 512 and box.downscale == 1.0 and box.step == 1.0
    # centred on the squiggle's box centre (1030.5, 2015.5)
    assert (box.ox, box.oy) == (math.floor(1030.5 - 256), math.floor(2015.5 - 256))
    # at 2 level-0 px per model px: same rule on the model grid
    box2 = squiggle_box(pts, 2.0, 512)
    assert box2.side == 512 and box2.size == 1024 and box2.step == 2.0
    assert box2.x0 == math.floor(1030.5 / 2 - 256) * 2


def test_box_large_squiggle_is_downscaled():
    pts = [(100.0, 100.0), (900.0, 300.0)]
    box = squiggle_box(pts, 1.0, 512)
    longer = 800.0
    assert box.side == math.ceil(longer + 2 * CONTEXT * longer)  # 1200
    assert box.downscale == pytest.approx(1200 / 512)
    # the box holds the squiggle with its context on every side
    assert box.x0 <= 100 - CONTEXT * longer + 1 and box.x0 + box.size >= 900 + CONTEXT * longer - 1
    # context never below MIN_CONTEXT; context=0 is the paper's rule (the squiggle's box)
    assert squiggle_box([(10, 10), (10, 10)], 1.0, 8).side == 2 * MIN_CONTEXT
    assert squiggle_box(pts, 1.0, 512, context=0, min_context=0).side == 800


def test_reads_and_inclusion_map_small_and_large(tmp_path):
    labels, rgb = gland_truth()
    slide = RecordingSlide(array_source(rgb, 0.5))
    prompts = Prompts(squiggles=[Squiggle(tuple(p), index=k) for k, p in enumerate(SQUIGGLES)])
    model = dark_gland_model()
    from nuclick_wsi.engine.background import Timer

    run = SquiggleStrategy(slide, prompts, model.mpp, model.patch_size, 0.5, first_label=1)
    order = run.plan({})
    batches = list(run.batches(order, Timer()))
    x = np.concatenate([b for b, _ in batches])
    ks = [k for _, m in batches for k in m]
    assert sorted(ks) == [0, 1, 2]
    for (rx, ry, rw, rh, ow, oh), k, xk in zip(slide.reads, ks, x):
        box = run.boxes[k]
        assert (rx, ry, rw, rh, ow, oh) == (box.x0, box.y0, box.size, box.size, 512, 512)
        if k == 1:  # small: native
            assert rw == 512
            assert xk[3, int(250.5 - box.y0), int(760.5 - box.x0)] == 1  # a vertex at its pixel
        if k == 2:  # long: read larger, downscaled
            assert rw > 512
            c, r = np.floor((np.array([300.5, 650.5]) - [box.x0, box.y0]) / box.step).astype(int)
            assert xk[3, r, c] == 1
        # inclusion map = the squiggle rasterised on the patch grid
        rr, cc = polyline_pixels(box.to_patch(np.array(SQUIGGLES[k])))
        ok = (rr >= 0) & (rr < 512) & (cc >= 0) & (cc < 512)
        expect = np.zeros((512, 512), bool)
        expect[rr[ok], cc[ok]] = True
        assert np.array_equal(xk[3] > 0, expect)


def test_exclusion_is_one_pixel_of_each_other_squiggle_in_the_patch():
    target = np.array([(1000.5, 1000.5), (1050.5, 1010.5)])
    near = np.array([(1100.5, 1100.5), (1130.5, 1120.5), (1160.5, 1100.5)])  # in the patch
    crossing = np.array([(600.5, 900.5), (1500.5, 900.5)])  # crosses the patch, no vertex inside
    far = np.array([(5000.5, 5000.5), (5100.5, 5000.5)])  # elsewhere
    box = squiggle_box(target, 1.0, 512)
    incl, excl = guidance_maps(target, [near, crossing, far], box)
    assert excl.sum() == 2
    for line in (near, crossing):
        rr, cc = polyline_pixels(box.to_patch(line))
        ok = (rr >= 0) & (rr < 512) & (cc >= 0) & (cc < 512)
        idx = np.flatnonzero(ok)
        r, c = rr[idx[len(idx) // 2]], cc[idx[len(idx) // 2]]  # the middle of its pixels in the patch
        assert excl[r, c] == 1
    _, alone = guidance_maps(target, [far], box)
    assert alone.sum() == 0
    assert incl.sum() > 0 and not (incl.astype(bool) & excl.astype(bool)).any()


# --------------------------------------------------------------------------------------------
# segmentation from squiggles


def test_glands_segmented_with_holes_and_downscaled_mask_scaled_back():
    labels, rgb = gland_truth()
    prompts = Prompts(squiggles=[Squiggle(tuple(p), index=k) for k, p in enumerate(SQUIGGLES)])
    out, instances, reasons = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(),
                                                   device="cpu", precision="fp32", first_label=11)
    assert reasons == {}
    assert [i.label for i in instances] == [11, 12, 13] and all(i.kind == "gland" for i in instances)
    # native patches: exactly the drawn glands, the lumen kept as a hole (0)
    assert np.array_equal(out == 11, labels == 1)
    assert np.array_equal(out == 12, labels == 2)
    assert out[RING["cy"], RING["cx"]] == 0
    ring = instances[0].geometry
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1
    assert np.array_equal(rasterize(ring, 0, 0, W, H), labels == 1)
    # downscaled patch: the mask is scaled back onto level-0 pixels
    assert iou(out == 13, labels == 3) > 0.98


def test_glands_at_another_resolution_keep_their_coordinates():
    labels, rgb = gland_truth()
    prompts = Prompts(squiggles=[Squiggle(tuple(p), index=k) for k, p in enumerate(SQUIGGLES)])
    # model at 1.0 um/px on a 0.5 um/px slide: 2 level-0 px per model px
    out, instances, reasons = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(mpp=1.0),
                                                   device="cpu", precision="fp32")
    assert reasons == {}
    for k in (1, 2, 3):
        assert iou(out == k, labels == k) > 0.95
        cy, cx = ndi.center_of_mass(out == k)
        ty, tx = ndi.center_of_mass(labels == k)
        assert abs(cy - ty) < 1.5 and abs(cx - tx) < 1.5
    assert out[RING["cy"], RING["cx"]] == 0  # the lumen (4000+ level-0 px > 1000 model px) stays a hole


def test_squiggle_outside_the_gland_and_off_slide_are_reported():
    labels, rgb = gland_truth()
    prompts = Prompts(squiggles=[Squiggle(((50.5, 850.5), (80.5, 860.5)), index=0),  # stroma only
                                 Squiggle(((5000.0, 5000.0), (5100.0, 5000.0)), index=1)])
    out, instances, reasons = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(),
                                                   device="cpu", precision="fp32")
    assert not instances and not out.any()
    assert reasons[0].startswith("nothing segmented: probability along the squiggle")
    assert reasons[1].startswith("outside the slide")


def qupath_file(path: Path, clicks, squiggles) -> Path:
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": list(c)},
              "properties": {"objectType": "annotation"}} for c in clicks]
    feats += [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [list(p) for p in s]},
               "properties": {"objectType": "annotation", "classification": {"name": "Gland", "color": [0, 160, 0]}}}
              for s in squiggles]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_end_to_end_qupath_lines_and_clicks(tmp_path):
    labels, rgb = gland_truth()
    slide = write_tiff_slide(tmp_path / "slide.tif", W, H, 0.5, rgb=rgb)
    clicks = [(800.5, 250.5), (100.5, 100.5), (1200.5, 800.5)]  # one inside the solid gland
    points = qupath_file(tmp_path / "prompts.geojson", clicks, SQUIGGLES)
    prompts = read_prompts(points)
    assert len(prompts.clicks) == 3 and len(prompts.squiggles) == 3
    out = tmp_path / "out"
    res = segment(slide, points, out, options=SegmentOptions(progress=False, device="cpu", precision="fp32"),
                  models=Models(nuclei=disk_model(radius=5, mpp=0.5), gland=dark_gland_model()))
    assert set(res.outputs) == {"labels", "glands", "report", "qupath"}
    assert all(p.exists() for p in res.outputs.values())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["slide.geojson", "slide.glands.zarr", "slide.labels.zarr",
                                                     "slide.report.json"]
    # one id space: clicks 1..3, squiggles 4..6; nuclei and glands in separate label arrays
    nuc = np.asarray(open_labels(res.outputs["labels"])[:])
    gla = np.asarray(open_labels(res.outputs["glands"])[:])
    assert set(np.unique(nuc)) == {0, 1, 2, 3}
    assert set(np.unique(gla)) == {0, 4, 5, 6}
    for k in (1, 2):
        assert np.array_equal(gla == k + 3, labels == k)
    assert iou(gla == 6, labels == 3) > 0.98
    assert gla[RING["cy"], RING["cx"]] == 0  # the lumen
    assert nuc[250, 800] == 1 and gla[250, 800] == 5  # a nucleus inside a gland is in both arrays
    table = read_instance_table(res.outputs["glands"] / "instances.csv")
    assert [r["label"] for r in table] == [4, 5, 6] and {r["kind"] for r in table} == {"gland"}
    assert [r["prompt_index"] for r in table] == [0, 1, 2]
    # GeoJSON: 3 nuclei and 3 glands, the ring with an interior ring, polygons = zarr labels
    feats = json.loads(res.outputs["qupath"].read_text())["features"]
    assert len(feats) == 6
    glands = [f for f in feats if (f["properties"].get("classification") or {}).get("name") == "Gland"]
    assert len(glands) == 3
    ring = shape(glands[0]["geometry"])
    assert glands[0]["geometry"]["type"] == "Polygon" and len(glands[0]["geometry"]["coordinates"]) == 2
    assert np.array_equal(rasterize(ring, 0, 0, W, H), gla == 4)
    solid = shape(glands[1]["geometry"])
    assert np.array_equal(rasterize(solid, 0, 0, W, H), gla == 5)
    # report
    rep = json.loads(res.outputs["report"].read_text())
    assert rep["totals"]["clicks"] == 3 and rep["totals"]["squiggles"] == 3 and rep["totals"]["glands_segmented"] == 3
    assert [r["instance_id"] for r in rep["squiggles"]] == [4, 5, 6]
    assert rep["squiggles"][2]["patch"]["downscale"] > 1 and rep["squiggles"][1]["patch"]["downscale"] == 1
    assert rep["gland_model"]["task"] == "gland" and rep["gland_model"]["postprocess"]["min_hole_px"] == 1000
    # a rerun: nuclei reused, glands recomputed, the same bytes and ids
    again = segment(slide, points, out, options=SegmentOptions(progress=False, device="cpu", precision="fp32"),
                    models=Models(nuclei=disk_model(radius=5, mpp=0.5), gland=dark_gland_model()))
    assert again.report["rerun"]["mode"] == "incremental" and again.report["rerun"]["reused"] == 3
    assert [r["instance_id"] for r in again.report["squiggles"]] == [4, 5, 6]
    assert np.array_equal(np.asarray(open_labels(res.outputs["glands"])[:]), gla)
    assert json.loads(res.outputs["qupath"].read_text())["features"] == feats


def test_squiggles_only_and_task_gland(tmp_path):
    labels, rgb = gland_truth()
    slide = write_tiff_slide(tmp_path / "slide.tif", W, H, 0.5, rgb=rgb)
    points = qupath_file(tmp_path / "lines.geojson", [], SQUIGGLES[:2])
    opts = SegmentOptions(progress=False, device="cpu", precision="fp32")
    res = segment(slide, points, tmp_path / "out", options=opts, models=Models(gland=dark_gland_model(), gland_only=True))
    gla = np.asarray(open_labels(res.outputs["glands"])[:])
    assert set(np.unique(gla)) == {0, 1, 2}  # no clicks: squiggle k gets k + 1
    assert not np.asarray(open_labels(res.outputs["labels"])[:]).any()  # the nucleus array is empty
    assert res.report["model"] is None and res.report["totals"]["glands_segmented"] == 2


def test_squiggles_without_a_gland_model_say_how_to_train_one(tmp_path):
    labels, rgb = gland_truth()
    slide = write_tiff_slide(tmp_path / "slide.tif", W, H, 0.5, rgb=rgb)
    points = qupath_file(tmp_path / "lines.geojson", [(100.5, 100.5)], SQUIGGLES[:1])
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="gland model.*nuclick-wsi train .*--task gland"):
        segment(slide, points, out, options=SegmentOptions(progress=False, device="cpu"),
                models=Models(nuclei=disk_model(mpp=0.5)))
    assert not out.exists() or not any(out.iterdir())
    result = CliRunner().invoke(__import__("nuclick_wsi.cli.main", fromlist=["main"]).main,
                                ["segment", str(slide), "--points", str(points), "-o", str(out), "-q"])
    assert result.exit_code == 1 and "gland model" in result.output and "--task gland" in result.output
    assert not out.exists() or not any(out.iterdir())
    # --task gland without a gland model: the same advice; a nucleus model is not a gland model
    with pytest.raises(ModelError, match="train"):
        segment(slide, points, out, options=SegmentOptions(progress=False), models=Models.from_flags(task="gland"))
    with pytest.raises(ModelError, match="not a gland model"):
        segment(slide, points, out, options=SegmentOptions(progress=False), models=Models(nuclei=disk_model(mpp=0.5), gland=disk_model(mpp=0.5)))
    # --task gland on a file without squiggles
    clicks_only = qupath_file(tmp_path / "clicks.geojson", [(100.5, 100.5)], [])
    with pytest.raises(NuclickError, match="no squiggles"):
        segment(slide, clicks_only, out, options=SegmentOptions(progress=False),
                models=Models(gland=dark_gland_model(), gland_only=True))


# --------------------------------------------------------------------------------------------
# training on synthetic glands, then the command line end to end


@pytest.fixture(scope="module")
def trained_gland_model(tmp_path_factory):
    """A tiny gland model trained for a few hundred samples on synthetic GlaS-layout images."""
    from PIL import Image

    from nuclick_wsi.training.train import TrainConfig, train

    data = tmp_path_factory.mktemp("glas")
    for k in range(4):
        labels = random_glands(384, 4, seed=10 + k, axes=(22, 50))
        Image.fromarray(paint(labels, texture=10, seed=k)).save(data / f"train_{k}.bmp")
        Image.fromarray(labels.astype(np.uint8)).save(data / f"train_{k}_anno.bmp")
    out = data / "gland.pt"
    torch.manual_seed(0)
    # the light U-Net and the paper's loss this test was written for (the defaults became s2d-unet + calibrated)
    cfg = TrainConfig(data=[str(data)], output=str(out), task="gland", arch="light-unet", loss="nuclick",
                      widths=[8, 16, 32, 64], patch_size=128,
                      epochs=5, samples_per_epoch=64, batch_size=8, device="cpu", lr=3e-3, mpp=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is several times faster on a busy 2-core machine
    try:
        result = train(cfg, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


@pytest.mark.slow
def test_short_training_learns_synthetic_glands(trained_gland_model):
    out, result = trained_gland_model
    hist = result["history"]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    ck = torch.load(out, map_location="cpu", weights_only=True)
    meta = ck["metadata"]
    assert meta["task"] == "gland" and meta["patch_size"] == 128
    assert meta["postprocess"] == POSTPROCESS_DEFAULTS["gland"]


def user_squiggle(mask: np.ndarray) -> list[tuple[float, float]]:
    """A squiggle as a user draws one: along the main axis, or round the lumen when there is one."""
    filled = ndi.binary_fill_holes(mask)
    rr, cc = np.nonzero(filled)
    cy, cx = rr.mean(), cc.mean()
    evals, evecs = np.linalg.eigh(np.cov(np.stack([cc - cx, rr - cy])))
    major, minor = evecs[:, 1], evecs[:, 0]  # (x, y) directions
    a, b = 2 * math.sqrt(evals[1]), 2 * math.sqrt(evals[0])  # semi-axes of the ellipse
    if (filled & ~mask).any():  # round the lumen, through the middle of the epithelium
        ts = np.linspace(0, 2 * math.pi, 24)
        pts = [(cx + 0.75 * (a * math.cos(t) * major[0] + b * math.sin(t) * minor[0]),
                cy + 0.75 * (a * math.cos(t) * major[1] + b * math.sin(t) * minor[1])) for t in ts]
    else:
        pts = [(cx + f * a * major[0], cy + f * a * major[1]) for f in (-0.6, -0.2, 0.2, 0.6)]
    return [(round(float(x), 2), round(float(y), 2)) for x, y in pts]


@pytest.mark.slow
def test_cli_segment_task_gland_with_trained_model(trained_gland_model, tmp_path):
    """QuPath LineStrings on a slide, a gland model trained here: glands found, holes kept, ids and areas right."""
    from nuclick_wsi.cli.main import main
    ckpt, _ = trained_gland_model
    labels = random_glands(384, 3, seed=99, axes=(25, 45))
    rgb = paint(labels, texture=10, seed=5)
    slide = write_tiff_slide(tmp_path / "slide.tif", 384, 384, 0.5, rgb=rgb)
    points = qupath_file(tmp_path / "lines.geojson", [], [user_squiggle(labels == i) for i in (1, 2, 3)])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", str(slide), "--points", str(points), "-o", str(out), "--task", "gland",
                                       "--weights", str(ckpt), "--device", "cpu", "--min-hole-px", "200", "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "slide.report.json").read_text())
    assert rep["totals"]["squiggles"] == 3 and rep["totals"]["glands_segmented"] == 3
    assert rep["gland_model"]["postprocess"]["min_hole_px"] == 200  # --task gland: overrides go to the gland model
    gla = np.asarray(open_labels(out / "slide.glands.zarr")[:])
    feats = json.loads((out / "slide.geojson").read_text())["features"]
    assert len(feats) == 3
    ious = []
    for rec, feat in zip(rep["squiggles"], feats):
        k = rec["instance_id"]
        assert k == rec["index"] + 1 and (gla == k).sum() == rec["area_px"]
        assert np.array_equal(rasterize(shape(feat["geometry"]), 0, 0, 384, 384), gla == k)
        truth = labels == k
        ious.append(iou(gla == k, truth))
        lumen = ndi.binary_fill_holes(truth) & ~truth
        if lumen.sum() > 200:  # the lumen stays a hole: 0 in the labels, an interior ring in the GeoJSON
            r, c = (int(round(v)) for v in ndi.center_of_mass(lumen))
            assert gla[r, c] == 0
            assert len(feat["geometry"]["coordinates"]) == 2
    assert min(ious) > 0.6 and np.mean(ious) > 0.8, ious


def test_glands_larger_than_a_chunk_row_stitch_the_same():
    labels, rgb = gland_truth()
    prompts = Prompts(squiggles=[Squiggle(tuple(p), index=k) for k, p in enumerate(SQUIGGLES)])
    kw = dict(device="cpu", precision="fp32")
    big, _, _ = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(), chunk=1024, **kw)
    small, _, _ = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(), chunk=64, **kw)
    assert np.array_equal(big, small)


def test_overlapping_glands_keep_their_squiggles():
    # two squiggles in one dark blob: each gland keeps its own line and stays one piece
    labels = np.zeros((400, 600), np.int32)
    labels[ellipse(labels.shape, 200, 300, 80, 220)] = 1
    rgb = paint(labels)
    a = ((150.5, 200.5), (250.5, 200.5))
    b = ((350.5, 200.5), (450.5, 200.5))
    prompts = Prompts(squiggles=[Squiggle(a, index=0), Squiggle(b, index=1)])
    out, instances, reasons = predict_gland_labels(array_source(rgb, 0.5), prompts, dark_gland_model(),
                                                   device="cpu", precision="fp32")
    assert reasons == {}
    for k, line in ((1, a), (2, b)):
        rr, cc = polyline_pixels(np.array(line))
        assert np.all(out[rr, cc] == k)
        assert ndi.label(out == k)[1] == 1  # one piece, holding its line
    assert not ((out > 0) & (labels == 0)).any()


def test_asap_splines_and_pointsets_of_a_squiggle_group(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("""<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
 <Annotation Name="g1" Type="Spline" PartOfGroup="Glands" Color="#00ff00"><Coordinates>
  <Coordinate Order="1" X="20" Y="10"/><Coordinate Order="0" X="10" Y="10"/><Coordinate Order="2" X="30" Y="15"/>
 </Coordinates></Annotation>
 <Annotation Name="g2" Type="PointSet" PartOfGroup="Glands" Color="#00ff00"><Coordinates>
  <Coordinate Order="0" X="50" Y="50"/><Coordinate Order="1" X="60" Y="55"/>
 </Coordinates></Annotation>
 <Annotation Name="n" Type="PointSet" PartOfGroup="Nuclei" Color="#ff0000"><Coordinates>
  <Coordinate Order="0" X="5" Y="5"/><Coordinate Order="1" X="6" Y="9"/>
 </Coordinates></Annotation>
</Annotations><AnnotationGroups>
 <Group Name="Glands" PartOfGroup="None" Color="#00ff00"/><Group Name="Nuclei" PartOfGroup="None" Color="#ff0000"/>
</AnnotationGroups></ASAP_Annotations>""")
    p = read_prompts(xml, squiggle_groups=["Glands"])
    assert [s.points for s in p.squiggles] == [((10.0, 10.0), (20.0, 10.0), (30.0, 15.0)), ((50.0, 50.0), (60.0, 55.0))]
    assert [(c.x, c.y) for c in p.clicks] == [(5.0, 5.0), (6.0, 9.0)]
    plain = read_prompts(xml)  # without the group: PointSets are clicks, the Spline a region
    assert not plain.squiggles and len(plain.clicks) == 4


def test_rerun_without_squiggles_drops_the_old_gland_labels(tmp_path):
    labels, rgb = gland_truth()
    slide = write_tiff_slide(tmp_path / "slide.tif", W, H, 0.5, rgb=rgb)
    out = tmp_path / "out"
    opts = SegmentOptions(progress=False, device="cpu", precision="fp32")
    both = qupath_file(tmp_path / "both.geojson", [(100.5, 100.5)], SQUIGGLES[:1])
    segment(slide, both, out, options=opts, models=Models(nuclei=disk_model(mpp=0.5), gland=dark_gland_model()))
    assert (out / "slide.glands.zarr").is_dir()
    clicks = qupath_file(tmp_path / "clicks.geojson", [(100.5, 100.5)], [])
    res = segment(slide, clicks, out, options=opts, models=Models(nuclei=disk_model(mpp=0.5)))
    assert "glands" not in res.outputs and "squiggles" not in res.report
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["slide.geojson", "slide.labels.zarr", "slide.report.json"]


def test_batch_rows_with_squiggles_use_the_gland_weights(trained_gland_model, tmp_path):
    """`batch --gland-weights`: a manifest row whose file holds lines gets its glands; without it the row fails."""
    from nuclick_wsi.cli.main import main
    ckpt, _ = trained_gland_model
    labels = random_glands(384, 2, seed=7, axes=(25, 45))
    write_tiff_slide(tmp_path / "g.tif", 384, 384, 0.5, rgb=paint(labels, texture=10, seed=5))
    qupath_file(tmp_path / "g.geojson", [], [user_squiggle(labels == i) for i in (1, 2)])
    (tmp_path / "m.csv").write_text("slide,points\ng.tif,g.geojson\n")
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "a"), "--device", "cpu", "-q"])
    assert r.exit_code == 1 and "gland" in (tmp_path / "a" / "g.failed.json").read_text()
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "b"), "--device", "cpu", "-q",
                                  "--gland-weights", str(ckpt)])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b" / "g.report.json").read_text())
    assert rep["totals"]["glands_segmented"] == 2
    assert (tmp_path / "b" / "g.glands.zarr").is_dir()
