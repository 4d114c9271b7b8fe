"""End-to-end tests of :func:`nuclick_wsi.pipeline.segment` with stand-in models.

The stand-in networks ignore the image (or look only at the patch centre), so every expected mask
is computed here, independently, from the documented geometry: the model pixel grid is anchored at
the level-0 origin, model pixel (i, j) covers level-0 [j * s, (j + 1) * s) x [i * s, (i + 1) * s)
(``s`` = level-0 px per model px), and a click (x, y) sits in model pixel (floor(x / s), floor(y / s)),
the centre of its patch.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from shapely.geometry import Point, shape
from torch import nn

from tests.helpers import centre_distance, DATA, DiskNet, disk_model, random_state_dict, write_tiff_slide
from nuclick_wsi._util.fs import TMP_MARK
from nuclick_wsi.errors import (AnnotationError, ModelError, NuclickError, OutputError, ResolutionError,
                                SlideError)
from nuclick_wsi.postprocess.trace import rasterize
from nuclick_wsi.model.weights import LoadedModel, load_model, save_checkpoint
from nuclick_wsi.guidance.clicks import check_clicks
from nuclick_wsi.outputs.paths import output_paths
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.store.instances import read_instance_table
from nuclick_wsi.store.labels import is_complete, open_labels

FOUR = ndi.generate_binary_structure(2, 1)
KEYS_JSON = DATA / "tiatoolbox_nuclick_keys.json"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def run(slide, points, out, model, **opts):
    """segment() on the CPU without a progress bar."""
    opts = {"progress": False, "device": "cpu", **opts}
    return segment(slide, points, out, options=SegmentOptions(**opts), models=Models(nuclei=model))


def write_csv(path: Path, clicks, header: str | None = None) -> Path:
    lines = [header] if header else []
    lines += [",".join(str(v) for v in c) for c in clicks]
    path.write_text("\n".join(lines) + "\n")
    return path


def features(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    obj = json.loads(data)
    assert obj["type"] == "FeatureCollection"
    return obj["features"]


def labels_of(out: Path, stem: str = "slide") -> np.ndarray:
    return open_labels(out / f"{stem}.labels.zarr")[:]


def files_in(folder: Path) -> list[str]:
    """The names in ``folder``, less the hidden commit marker (bookkeeping: tests/outputs/test_commit_marker.py)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".nuclick-commit.json")) if folder.exists() else []


def assert_nothing_written(out: Path) -> None:
    assert files_in(out) == [], f"left behind in {out}: {files_in(out)}"


def _sigmoid(z):
    from scipy.special import expit

    return expit(z)


def expected_mask(x: float, y: float, radius: float, scale: float, width: int, height: int) -> np.ndarray:
    """The level-0 mask DiskNet's disk should give for a click, from the documented frame.

    Model probability at model pixel (i, j): sigmoid(2 * (radius - distance to the click's model
    pixel)). At scale 1 a level-0 pixel is a model pixel; otherwise level-0 pixel (u, v) takes the
    bilinear interpolation of the model grid at its centre, model coordinate (u + 0.5) / s - 0.5.
    Threshold 0.5, then the 4-connected component holding the click's pixel.
    """
    gx, gy = math.floor(x / scale), math.floor(y / scale)
    cx, cy = math.floor(x), math.floor(y)
    if scale == 1.0:
        jj, ii = np.meshgrid(np.arange(width), np.arange(height))
        fg = np.hypot(jj - gx, ii - gy) <= radius
    else:
        def p(i, j):
            return _sigmoid(2.0 * (radius - np.hypot(j - gx, i - gy)))

        mx = (np.arange(width) + 0.5) / scale - 0.5
        my = (np.arange(height) + 0.5) / scale - 0.5
        j0, i0 = np.floor(mx), np.floor(my)
        fx, fy = (mx - j0)[None, :], (my - i0)[:, None]
        J0, I0 = j0[None, :], i0[:, None]
        prob = ((1 - fy) * (1 - fx) * p(I0, J0) + (1 - fy) * fx * p(I0, J0 + 1)
                + fy * (1 - fx) * p(I0 + 1, J0) + fy * fx * p(I0 + 1, J0 + 1))
        near = np.abs(prob - 0.5) < 1e-4
        assert not near.any(), "test set-up: a pixel's probability is too close to the threshold"
        fg = prob >= 0.5
    lab, _ = ndi.label(fg, structure=FOUR)
    assert lab[cy, cx] > 0
    return lab == lab[cy, cx]


def geometry_raster(feature: dict, width: int, height: int) -> np.ndarray:
    return rasterize(shape(feature["geometry"]), 0, 0, width, height)


class RingNet(nn.Module):
    """Probability highest at ``peak`` px from the click, lower at the click itself.

    Two clicks ``peak`` px apart: each click's pixel is where its neighbour is most confident.
    """

    def __init__(self, radius: float = 4.0, peak: float = 3.0) -> None:
        super().__init__()
        self.radius, self.peak = radius, peak
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        d = centre_distance(h, w)
        logit = 2.0 * (self.radius - torch.abs(d - self.peak)) + self.dummy
        return logit.expand(n, 1, h, w).clone()


class DarkDiskNet(DiskNet):
    """DiskNet where the click's pixel is dark (red < 0.5); background (logit -5) elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        disk = super().forward(x)
        h, w = x.shape[2:]
        dark = (x[:, 0, h // 2, w // 2] < 0.5).float().view(-1, 1, 1, 1)
        return dark * disk + (1 - dark) * -5.0


def _model(net: nn.Module, mpp: float = 0.25, arch: str = "test") -> LoadedModel:
    meta = {"mpp": mpp, "patch_size": 128, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 1, "min_hole_px": 0}}
    return LoadedModel(net=net.eval(), arch=arch, arch_args={}, metadata=meta, source=f"test:{arch}")


# --------------------------------------------------------------------------------------------
# 1. the frame
# --------------------------------------------------------------------------------------------

W, H = 1024, 768


@pytest.mark.parametrize("slide_mpp, radius, scale", [
    (0.25, 5.5, 1.0),
    (0.2527, 5.5, 1.0),   # within 5 % of the model's 0.25: read natively, same pixels
    (0.5, 10.5, 0.5),     # 20x slide: the model grid is twice as fine as level 0
    (0.125, 5.5, 2.0),    # 80x slide: read from pyramid level 1
])
def test_click_lands_on_the_right_pixels(tmp_path, slide_mpp, radius, scale):
    slide = write_tiff_slide(tmp_path / "slide.tif", W, H, slide_mpp)
    # interior, fractional, at the slide's corners, across chunk corners (chunk 256) and region rows
    clicks = [(300.5, 200.5), (611.9, 402.2), (3.2, 2.7), (W - 2.5, H - 1.2), (100.0, 700.99),
              (256.0, 255.5), (512.3, 512.0), (800.7, 255.9)]
    pts = write_csv(tmp_path / "clicks.csv", clicks)
    out = tmp_path / "out"
    result = run(slide, pts, out, disk_model(radius, mpp=0.25), chunk=256)
    report = result.report
    assert report["mpp"]["level0_px_per_model_px"] == scale
    n = len(clicks)
    assert report["totals"] == {"clicks": n, "segmented": n, "skipped": 0, "skipped_by_reason": {}}

    expected = np.zeros((H, W), np.uint32)
    for k, (x, y) in enumerate(clicks):
        m = expected_mask(x, y, radius, scale, W, H)
        assert not (expected[m] != 0).any(), "test set-up: disks must not overlap"
        expected[m] = k + 1
    labels = labels_of(out)
    assert labels.shape == (H, W) and labels.dtype == np.uint32
    np.testing.assert_array_equal(labels, expected)

    feats = {f["id"]: f for f in features(out / "slide.geojson")}
    assert len(feats) == n
    for rec in report["clicks"]:
        k = rec["index"]
        assert rec["instance_id"] == k + 1
        f = feats[rec["uuid"]]
        assert f["geometry"]["type"] == "Polygon"
        np.testing.assert_array_equal(geometry_raster(f, W, H), labels == k + 1)
        assert f["properties"]["measurements"]["Area px"] == (labels == k + 1).sum() == rec["area_px"]


def test_scale_one_disk_is_centred_on_the_click_pixel(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(200.99, 100.01)])
    out = tmp_path / "out"
    run(slide, pts, out, disk_model(6.0))
    rows, cols = np.nonzero(labels_of(out) == 1)
    # the disk of radius 6 around pixel (200, 100): 113 lattice points, symmetric about it
    assert len(rows) == 113
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (194, 206, 94, 106)
    assert cols.mean() == 200 and rows.mean() == 100


# --------------------------------------------------------------------------------------------
# 2. input formats
# --------------------------------------------------------------------------------------------

CLICKS3 = [(100.5, 120.5), (200.0, 150.0), (300.0, 200.0)]
RED, BLUE = [255, 0, 0], [0, 0, 255]


def _geojson(path):
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": list(CLICKS3[0])},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": RED}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [list(CLICKS3[1]), list(CLICKS3[2])]},
         "properties": {"objectType": "annotation", "classification": {"name": "Lymph", "color": BLUE}}},
    ]}
    path.write_text(json.dumps(fc))
    return path


def _asap(path):
    # PointSet vertices out of document order: ASAP places them by Order
    path.write_text(f"""<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="a" Type="Dot" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="{CLICKS3[0][0]}" Y="{CLICKS3[0][1]}"/></Coordinates>
    </Annotation>
    <Annotation Name="b" Type="PointSet" PartOfGroup="Lymph" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="1" X="{CLICKS3[2][0]}" Y="{CLICKS3[2][1]}"/>
        <Coordinate Order="0" X="{CLICKS3[1][0]}" Y="{CLICKS3[1][1]}"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="roi" Type="Polygon" PartOfGroup="None" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="50" Y="0"/>
        <Coordinate Order="2" X="50" Y="50"/></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="Tumor" PartOfGroup="None" Color="#ff0000"><Attributes/></Group>
    <Group Name="Lymph" PartOfGroup="None" Color="#0000ff"><Attributes/></Group>
  </AnnotationGroups>
</ASAP_Annotations>
""")
    return path


def _imagescope(path):
    # LineColor is a COLORREF 0x00BBGGRR: 255 is red, 16711680 blue
    path.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.250000">
  <Annotation Id="1" Name="Tumor" LineColor="255">
    <Regions>
      <Region Id="1" Type="5"><Vertices><Vertex X="{CLICKS3[0][0]}" Y="{CLICKS3[0][1]}" Z="0"/></Vertices></Region>
    </Regions>
  </Annotation>
  <Annotation Id="2" Name="Lymph" LineColor="16711680">
    <Regions>
      <Region Id="1" Type="5"><Vertices><Vertex X="{CLICKS3[1][0]}" Y="{CLICKS3[1][1]}" Z="0"/></Vertices></Region>
      <Region Id="2" Type="0"><Vertices><Vertex X="{CLICKS3[2][0]}" Y="{CLICKS3[2][1]}" Z="0"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
""")
    return path


def _csv_header(path):
    path.write_text("class;y;x\nTumor;120,5;100,5\nLymph;150;200\nLymph;200;300\n")
    return path


def _csv_plain(path):
    return write_csv(path, [(x, y, c) for (x, y), c in zip(CLICKS3, ["Tumor", "Lymph", "Lymph"])])


def _csv_no_class(path):
    path.write_text("# x, y\n\n" + "\n".join(f"{x}\t{y}" for x, y in CLICKS3) + "\n")
    return path


@pytest.mark.parametrize("maker, fmt, classes, colors", [
    (_geojson, "qupath", ["Tumor", "Lymph", "Lymph"], [RED, BLUE, BLUE]),
    (_asap, "asap", ["Tumor", "Lymph", "Lymph"], [RED, BLUE, BLUE]),
    (_imagescope, "imagescope", ["Tumor", "Lymph", "Lymph"], [RED, BLUE, BLUE]),
    (_csv_header, "csv", ["Tumor", "Lymph", "Lymph"], None),
    (_csv_plain, "csv", ["Tumor", "Lymph", "Lymph"], None),
    (_csv_no_class, "csv", [None, None, None], None),
], ids=["geojson", "asap", "imagescope", "csv-header", "csv-plain", "csv-no-class"])
def test_input_formats_carry_clicks_and_classes(tmp_path, maker, fmt, classes, colors):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = maker(tmp_path / "points.in")
    out = tmp_path / "out"
    report = run(slide, pts, out, disk_model(5.5), formats=("qupath", "asap")).report
    assert report["points"]["format"] == fmt
    assert report["totals"]["segmented"] == 3
    labels = labels_of(out)
    for k, ((x, y), rec) in enumerate(zip(CLICKS3, report["clicks"])):
        assert (rec["x"], rec["y"], rec["class"]) == (x, y, classes[k])
        assert labels[math.floor(y), math.floor(x)] == rec["instance_id"] == k + 1

    feats = {f["id"]: f for f in features(out / "slide.geojson")}
    for k, rec in enumerate(report["clicks"]):
        props = feats[rec["uuid"]]["properties"]
        assert props["objectType"] == "detection"
        if classes[k] is None:
            assert "classification" not in props
        else:
            assert props["classification"]["name"] == classes[k]
            if colors is not None:
                assert props["classification"]["color"] == colors[k]
        assert shape(feats[rec["uuid"]]["geometry"]).contains(Point(CLICKS3[k]))

    import defusedxml.ElementTree as DET

    root = DET.parse(out / "slide.xml").getroot()
    anns = {a.get("Name"): a for a in root.iter("Annotation")}
    assert sorted(anns) == ["1", "2", "3"]
    for k in range(3):
        assert anns[str(k + 1)].get("PartOfGroup") == (classes[k] or "None")
    groups = {g.get("Name"): g.get("Color") for g in root.iter("Group")}
    assert set(groups) == {c for c in classes if c}
    if colors is not None:
        assert groups == {"Tumor": "#ff0000", "Lymph": "#0000ff"}


# --------------------------------------------------------------------------------------------
# 3. overlaps
# --------------------------------------------------------------------------------------------


def _assert_one_component_with_click(labels, label, x, y):
    lab, n = ndi.label(labels == label, structure=FOUR)
    assert n == 1, f"instance {label} has {n} 4-connected parts"
    assert labels[math.floor(y), math.floor(x)] == label


@pytest.mark.parametrize("a, b", [
    ((100.5, 100.5), (106.5, 100.5)),  # side by side
    ((100.5, 253.5), (100.5, 259.5)),  # across a chunk row (chunk 256)
    ((300.5, 509.5), (300.5, 515.5)),  # across a region row (512 model px): streamed in two passes
    ((300.5, 515.5), (303.5, 509.5)),  # the later click in the file is the upper one
], ids=["side", "chunk-row", "region-row", "diagonal"])
def test_overlap_goes_to_the_nearer_click(tmp_path, a, b):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 768, 0.25)
    pts = write_csv(tmp_path / "c.csv", [a, b])
    out = tmp_path / "out"
    report = run(slide, pts, out, disk_model(6.0), chunk=256).report
    assert report["totals"]["segmented"] == 2
    labels = labels_of(out)
    jj, ii = np.meshgrid(np.arange(512), np.arange(768))
    (ax, ay), (bx, by) = (math.floor(v) for v in a), (math.floor(v) for v in b)
    da, db = np.hypot(jj - ax, ii - ay), np.hypot(jj - bx, ii - by)
    assert np.array_equal(labels > 0, np.minimum(da, db) <= 6), "the union is both disks"
    assert (labels[(da < db) & (da <= 6)] == 1).all()
    assert (labels[(db < da) & (db <= 6)] == 2).all()
    tie = (da == db) & (da <= 6)
    assert np.isin(labels[tie], [1, 2]).all()
    for k, (x, y) in enumerate([a, b]):
        _assert_one_component_with_click(labels, k + 1, x, y)
    # polygons follow the zarr labels and do not overlap
    feats = features(out / "slide.geojson")
    geoms = [shape(f["geometry"]) for f in feats]
    assert geoms[0].intersection(geoms[1]).area == 0
    for f, g in zip(feats, geoms):
        lab = int(next(r["instance_id"] for r in report["clicks"] if r["uuid"] == f["id"]))
        np.testing.assert_array_equal(rasterize(g, 0, 0, 512, 768), labels == lab)


def test_a_click_keeps_its_own_pixel(tmp_path):
    """Each click's pixel is where its neighbour's probability peaks; it still stays with its click."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    clicks = [(100.5, 100.5), (103.5, 100.5), (200.5, 200.5), (200.5, 203.5)]
    pts = write_csv(tmp_path / "c.csv", clicks)
    out = tmp_path / "out"
    report = run(slide, pts, out, _model(RingNet(4.0, 3.0))).report
    assert report["totals"]["segmented"] == 4
    labels = labels_of(out)
    for k, (x, y) in enumerate(clicks):
        _assert_one_component_with_click(labels, k + 1, x, y)
    feats = features(out / "slide.geojson")
    assert [f["geometry"]["type"] for f in feats] == ["Polygon"] * 4


def test_check_clicks_reasons(tmp_path):
    from nuclick_wsi.records import Click, Prompts
    from nuclick_wsi.io.slides.memory import array_source

    src = array_source(np.zeros((100, 200, 3), np.uint8), 0.25)
    pr = Prompts(clicks=[Click(10, 10), Click(11.5, 10), Click(13, 10), Click(-0.01, 5), Click(200, 5),
                         Click(5, 99.99), Click(float("nan"), 5)])
    reasons = check_clicks(pr, src, 2.0)
    assert reasons[0] is None and reasons[2] is None and reasons[5] is None
    assert "duplicate" in reasons[1] and "click 0" in reasons[1]
    assert all(reasons[k].startswith("outside") for k in (3, 4, 6))


# --------------------------------------------------------------------------------------------
# 4. the report
# --------------------------------------------------------------------------------------------


def test_report_has_every_click_in_input_order(tmp_path):
    rgb = np.full((768, 1024, 3), 60, np.uint8)  # dark tissue everywhere...
    rgb[280:320, 580:620] = 240  # ...but a bright (background) square
    slide = write_tiff_slide(tmp_path / "slide.tif", 1024, 768, 0.25, rgb=rgb)
    clicks = [
        (100.5, 100.5),    # 0 segmented
        (-5, 10),          # 1 outside
        (101.2, 100.9),    # 2 duplicate of 0 (0.8 px)
        (2000, 100),       # 3 outside
        (400.5, 300.5),    # 4 segmented
        (1023.9, 767.9),   # 5 segmented (last pixel)
        (1024, 10),        # 6 outside (x == width)
        (600.5, 300.5),    # 7 background
        (401.9, 301.5),    # 8 duplicate of 4 (1.7 px)
        (100.5, 103.0),    # 9 2.5 px from 0: not a duplicate, its own instance
    ]
    pts = write_csv(tmp_path / "c.csv", clicks)
    out = tmp_path / "out"
    report = run(slide, pts, out, _model(DarkDiskNet(5.5))).report
    recs = report["clicks"]
    assert [r["index"] for r in recs] == list(range(len(clicks)))
    assert [(r["x"], r["y"]) for r in recs] == [(float(x), float(y)) for x, y in clicks]
    assert [r["source"] for r in recs] == [f"line {k + 1}" for k in range(len(clicks))]
    status = {k: r["status"] for k, r in enumerate(recs)}
    assert [k for k, s in status.items() if s == "segmented"] == [0, 4, 5, 9]
    reasons = {k: r.get("reason", "") for k, r in enumerate(recs)}
    for k in (1, 3, 6):
        assert reasons[k].startswith("outside the slide"), reasons[k]
    assert "duplicate" in reasons[2] and "click 0" in reasons[2]
    assert "duplicate" in reasons[8] and "click 4" in reasons[8]
    assert reasons[7].startswith("nothing segmented"), reasons[7]

    t = report["totals"]
    assert t["clicks"] == len(clicks) == t["segmented"] + t["skipped"]
    assert (t["segmented"], t["skipped"]) == (4, 6)
    assert sum(t["skipped_by_reason"].values()) == t["skipped"]
    assert t["skipped_by_reason"]["outside the slide"] == 3
    assert t["skipped_by_reason"]["nothing segmented"] == 1

    labels = labels_of(out)
    feats = {f["id"]: f for f in features(out / "slide.geojson")}
    assert len(feats) == t["segmented"]
    ids = set()
    for r in recs:
        if r["status"] == "segmented":
            x, y = r["x"], r["y"]
            assert r["instance_id"] == labels[math.floor(y), math.floor(x)] == r["index"] + 1
            f = feats[r["uuid"]]
            assert f["properties"]["measurements"]["Area px"] == r["area_px"] == (labels == r["instance_id"]).sum()
            np.testing.assert_array_equal(geometry_raster(f, 1024, 768), labels == r["instance_id"])
            ids.add(r["instance_id"])
        else:
            assert r["instance_id"] is None and "uuid" not in r
    assert set(np.unique(labels)) - {0} == ids
    written = json.loads((out / "slide.report.json").read_text())
    assert written["clicks"] == recs and written["totals"] == t


def test_reasons_are_grouped_by_kind(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(50, 50), (50.5, 50), (51, 50), (200, 200), (200.5, 200.5)])
    report = run(slide, pts, tmp_path / "out", disk_model(5.5)).report
    assert report["totals"]["skipped_by_reason"] == {"duplicate": 3}


# --------------------------------------------------------------------------------------------
# 5. bad inputs: an error naming the file, nothing written
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    """A 512 x 384 slide at 0.25 um/px, two clicks on it, an empty output folder."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(100.5, 100.5), (300.5, 200.5)])
    out = tmp_path / "out"
    out.mkdir()
    return slide, pts, out


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_unreadable_slide(shared_data, small, name):
    _, pts, out = small
    bad = shared_data / "slides" / name
    with pytest.raises(SlideError, match=name.replace(".", r"\.")) as exc:
        run(bad, pts, out, disk_model())
    assert "\n" not in str(exc.value)
    assert_nothing_written(out)


def test_missing_slide(small, tmp_path):
    _, pts, out = small
    with pytest.raises(SlideError, match="nope.svs"):
        run(tmp_path / "nope.svs", pts, out, disk_model())
    assert_nothing_written(out)


def test_malformed_annotation_file(small, tmp_path):
    slide, _, out = small
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection",\n "features": [\n  {"type": "Feature",, }\n]}\n')
    with pytest.raises(AnnotationError, match=r"broken\.geojson.*line 3") as exc:
        run(slide, bad, out, disk_model())
    assert "\n" not in str(exc.value)
    assert_nothing_written(out)


def test_malformed_csv_names_line(small, tmp_path):
    slide, _, out = small
    bad = tmp_path / "bad.csv"
    bad.write_text("10,20\n30,abc\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv.*line 2"):
        run(slide, bad, out, disk_model())
    assert_nothing_written(out)


def test_no_clicks(small, tmp_path):
    slide, _, out = small
    only_polygon = tmp_path / "regions.geojson"
    only_polygon.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}}]}))
    with pytest.raises(NuclickError, match=r"regions\.geojson.*no clicks"):
        run(slide, only_polygon, out, disk_model())
    assert_nothing_written(out)
    empty = tmp_path / "empty.csv"
    empty.write_text("x,y\n")
    with pytest.raises(NuclickError, match=r"empty\.csv"):
        run(slide, empty, out, disk_model())
    assert_nothing_written(out)


def test_all_clicks_outside(small, tmp_path):
    slide, _, out = small
    pts = write_csv(tmp_path / "far.csv", [(5000, 10), (-1, 5), (10, 384)])
    with pytest.raises(NuclickError, match=r"far\.csv.*none of its 3 clicks") as exc:
        run(slide, pts, out, disk_model())
    assert "slide.tif" in str(exc.value)
    assert_nothing_written(out)


def test_unknown_resolution_then_mpp(tmp_path):
    slide = write_tiff_slide(tmp_path / "noresolution.tif", 512, 384, None)
    pts = write_csv(tmp_path / "c.csv", [(100.5, 100.5)])
    out = tmp_path / "out"
    with pytest.raises(ResolutionError, match=r"noresolution\.tif.*--mpp"):
        run(slide, pts, out, disk_model(5.5))
    assert_nothing_written(out)
    report = run(slide, pts, out, disk_model(5.5), mpp=0.25).report
    assert report["mpp"]["slide"] == 0.25 and report["mpp"]["source"] == "given (--mpp)"
    assert report["totals"]["segmented"] == 1
    np.testing.assert_array_equal(labels_of(out, "noresolution") == 1,
                                  expected_mask(100.5, 100.5, 5.5, 1.0, 512, 384))


def test_weights_of_another_width(small, tmp_path):
    from nuclick_wsi.model.architectures.unet import LightUNet

    slide, pts, out = small
    path = tmp_path / "narrow.pt"
    # tensors of a (8, 16, 32, 64) network, metadata claiming the default (16, 32, 64, 128)
    save_checkpoint(path, LightUNet((8, 16, 32, 64)), "light-unet", {"widths": [16, 32, 64, 128]},
                    {"mpp": 0.25, "task": "nuclei"})
    with pytest.raises(ModelError, match=r"narrow\.pt.*do not fit") as exc:
        segment(slide, pts, out, options=SegmentOptions(progress=False, device="cpu"), models=Models(nuclei=str(path)))
    assert "\n" not in str(exc.value)
    assert_nothing_written(out)


def test_weights_that_are_not_a_checkpoint(small, tmp_path):
    slide, pts, out = small
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match=r"junk\.pt") as exc:
        segment(slide, pts, out, options=SegmentOptions(progress=False, device="cpu"), models=Models(nuclei=str(junk)))
    assert "\n" not in str(exc.value)
    other = tmp_path / "dict.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ModelError, match=r"dict\.pt.*neither"):
        segment(slide, pts, out, options=SegmentOptions(progress=False, device="cpu"), models=Models(nuclei=str(other)))
    with pytest.raises(ModelError, match=r"missing\.pt"):
        segment(slide, pts, out, options=SegmentOptions(progress=False, device="cpu"),
                models=Models(nuclei=str(tmp_path / "missing.pt")))
    assert_nothing_written(out)


def test_unwritable_output_folder(small, tmp_path):
    slide, pts, _ = small
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: use a folder below a regular file
            afile = tmp_path / "afile"
            afile.write_text("not a folder")
            out = afile / "out"
            with pytest.raises(OutputError, match=r"afile/out"):
                run(slide, pts, out, disk_model())
            assert afile.read_text() == "not a folder"
        else:
            with pytest.raises(OutputError, match="locked"):
                run(slide, pts, locked, disk_model())
            assert_nothing_written(locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("rerun", [False, True], ids=["fresh", "over-previous"])
def test_failure_while_writing_leaves_nothing(small, monkeypatch, rerun):
    slide, pts, out = small
    before = {}
    if rerun:
        run(slide, pts, out, disk_model(5.5))
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert set(before) == {"slide.geojson", "slide.report.json", ".slide.nuclick-commit.json"}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nuclick_wsi.outputs.commit.write_qupath", boom)
    with pytest.raises(OutputError, match=f"output folder {out}: no space left on device"):  # one line, the folder
        run(slide, pts, out, disk_model(5.5))
    assert not [n for n in files_in(out) if n.startswith(TMP_MARK)]
    if rerun:  # the previous complete outputs are untouched
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        assert is_complete(out / "slide.labels.zarr")
    else:
        assert_nothing_written(out)


def test_failure_in_the_model_leaves_nothing(small):
    slide, pts, out = small

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        run(slide, pts, out, _model(Broken()))
    assert_nothing_written(out)


def test_bad_options(small):
    slide, pts, out = small
    with pytest.raises(NuclickError, match="object type"):
        run(slide, pts, out, disk_model(), object_type="polygon")
    with pytest.raises(NuclickError, match="format"):
        run(slide, pts, out, disk_model(), formats=("qupath", "shapefile"))
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------
# 6. TIAToolbox-keyed weights
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiatoolbox_state_dict_loads_and_segments(tmp_path):
    sd = random_state_dict(json.loads(KEYS_JSON.read_text())["keys"], 0)
    path = tmp_path / "nuclick_original-pannuke.pth"
    torch.save(sd, path)
    del sd
    model = load_model(path)
    assert model.arch == "nuclick"
    assert model.mpp == 0.25 and model.patch_size == 128
    assert model.postprocess["threshold"] == pytest.approx(0.33)

    slide = write_tiff_slide(tmp_path / "slide.tif", 256, 256, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(60.5, 70.5), (180.5, 150.5)])
    out = tmp_path / "out"
    report = run(slide, pts, out, model, precision="fp32", batch_size=2).report
    assert report["model"]["arch"] == "nuclick"
    assert report["model"]["source"] == str(path)
    assert report["totals"]["clicks"] == 2 == len(report["clicks"])
    labels = labels_of(out)
    for r in report["clicks"]:  # random weights: either an instance on its click, or a reason
        if r["status"] == "segmented":
            assert labels[math.floor(r["y"]), math.floor(r["x"])] == r["instance_id"]
        else:
            assert r["reason"].startswith("nothing segmented")
    assert is_complete(out / "slide.labels.zarr")


# --------------------------------------------------------------------------------------------
# 7. determinism and reruns
# --------------------------------------------------------------------------------------------


def _some_clicks(n=40, seed=0, width=1024, height=768):
    rng = np.random.default_rng(seed)
    return [(round(float(x), 2), round(float(y), 2), c) for x, y, c in
            zip(rng.uniform(0, width, n), rng.uniform(0, height, n), rng.choice(["A", "B"], n))]


def test_two_runs_give_identical_outputs(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 1024, 768, 0.5)
    pts = write_csv(tmp_path / "c.csv", _some_clicks(), header="x,y,class")
    r1 = run(slide, pts, tmp_path / "o1", disk_model(9.0), formats=("qupath", "asap"), chunk=256)
    r2 = run(slide, pts, tmp_path / "o2", disk_model(9.0), formats=("qupath", "asap"), chunk=256)
    for name in ("slide.geojson", "slide.xml", "slide.labels.zarr/instances.csv"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
    np.testing.assert_array_equal(labels_of(tmp_path / "o1"), labels_of(tmp_path / "o2"))
    assert r1.report["clicks"] == r2.report["clicks"]


def test_rerun_replaces_previous_outputs(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 1024, 768, 0.25)
    first = write_csv(tmp_path / "first.csv", _some_clicks(30, seed=1))
    second = write_csv(tmp_path / "second.csv", _some_clicks(10, seed=2))
    out = tmp_path / "out"
    run(slide, first, out, disk_model(5.5), formats=("qupath", "asap", "geoparquet"))
    assert len(features(out / "slide.geojson")) > 10
    r = run(slide, second, out, disk_model(5.5), formats=("qupath", "asap", "geoparquet"))
    # other clicks: new ids after the 30 removed ones (never given again in this folder)
    assert {c["instance_id"] for c in r.report["clicks"]} - {None} <= set(range(31, 41))
    assert r.report["rerun"]["ids"] == {"kept": 0, "new": 10, "removed": 30, "next_id": 41}
    r = run(slide, second, out, disk_model(5.5), formats=("qupath", "asap", "geoparquet"), full=True)
    assert r.report["rerun"]["why_full"] == "--full"
    run(slide, second, tmp_path / "fresh", disk_model(5.5), formats=("qupath", "asap", "geoparquet"))
    assert files_in(out) == files_in(tmp_path / "fresh") == sorted(
        ["slide.geojson", "slide.xml", "slide.parquet", "slide.labels.zarr", "slide.report.json"])
    for name in ("slide.geojson", "slide.xml", "slide.labels.zarr/instances.csv"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    labels = labels_of(out)
    np.testing.assert_array_equal(labels, labels_of(tmp_path / "fresh"))
    assert labels.max() <= 10
    assert r.report["totals"]["clicks"] == 10
    assert json.loads((out / "slide.report.json").read_text())["points"]["path"] == str(second)


# --------------------------------------------------------------------------------------------
# 8. outputs
# --------------------------------------------------------------------------------------------


def test_label_store_and_instance_table(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 1024, 768, 0.25)
    pts = write_csv(tmp_path / "c.csv", _some_clicks(25, seed=3), header="x,y,class")
    out = tmp_path / "out"
    report = run(slide, pts, out, disk_model(6.0), chunk=256).report
    store = out / "slide.labels.zarr"
    assert is_complete(store)
    attrs = json.loads((store / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert ms["axes"][0].get("unit") == "micrometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.25, 0.25]
    assert len(ms["datasets"]) >= 2  # a pyramid down to one chunk
    assert attrs["image-label"]["version"] == "0.4"
    z0 = open_labels(store)
    assert z0.chunks == (256, 256) and z0.shape == (768, 1024)

    labels = z0[:]
    table = read_instance_table(store)
    segmented = [r for r in report["clicks"] if r["status"] == "segmented"]
    assert [row["label"] for row in table] == [r["instance_id"] for r in segmented]
    assert set(np.unique(labels)) - {0} == {row["label"] for row in table}
    for row, rec in zip(table, segmented):
        assert row["prompt_index"] == rec["index"] == row["label"] - 1
        assert row["class_name"] == rec["class"]
        assert (row["x"], row["y"]) == (rec["x"], rec["y"])
        rr, cc = np.nonzero(labels == row["label"])
        assert row["area_px"] == len(rr) == rec["area_px"]
        assert row["area_um2"] == pytest.approx(len(rr) * 0.0625)
        assert row["centroid_x"] == pytest.approx(cc.mean() + 0.5, abs=1e-3)
        assert row["centroid_y"] == pytest.approx(rr.mean() + 0.5, abs=1e-3)
        assert row["kind"] == "nucleus" and 0.5 <= row["score"] <= 1
    # level 1 is level 0 [::2, ::2]
    import zarr

    lvl1 = zarr.open_group(str(store), mode="r")["1"][:]
    np.testing.assert_array_equal(lvl1, labels[::2, ::2])


def test_all_formats_cell_objects_and_gzip(tmp_path):
    import geopandas as gpd

    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(100.5, 100.5, "T"), (300.5, 200.5, "")])
    out = tmp_path / "out"
    result = run(slide, pts, out, disk_model(5.5), formats=("qupath", "asap", "geoparquet"),
                 object_type="cell", gzip=True)
    assert files_in(out) == ["slide.geojson.gz", "slide.labels.zarr", "slide.parquet", "slide.report.json",
                             "slide.xml"]
    assert result.outputs == output_paths(out, "slide", ("qupath", "asap", "geoparquet"), gzip=True)
    feats = features(out / "slide.geojson.gz")
    assert [f["properties"]["objectType"] for f in feats] == ["cell", "cell"]
    assert all(f["nucleusGeometry"] == f["geometry"] for f in feats)
    assert feats[0]["properties"]["classification"]["name"] == "T"
    assert "classification" not in feats[1]["properties"]
    frame = gpd.read_parquet(out / "slide.parquet")
    assert list(frame["label"]) == [1, 2]
    assert list(frame["id"]) == [f["id"] for f in feats]
    labels = labels_of(out)
    for g, lab in zip(frame.geometry, frame["label"]):
        np.testing.assert_array_equal(rasterize(g, 0, 0, 512, 384), labels == lab)
    assert list(frame["area_px"]) == [float((labels == k).sum()) for k in (1, 2)]


def test_annotation_object_type_and_stem(tmp_path):
    slide = write_tiff_slide(tmp_path / "my.slide.ome.tiff", 512, 384, 0.25)
    pts = write_csv(tmp_path / "c.csv", [(100.5, 100.5)])
    out = tmp_path / "out"
    run(slide, pts, out, disk_model(5.5), object_type="annotation")
    assert files_in(out) == ["my.slide.geojson", "my.slide.labels.zarr", "my.slide.report.json"]
    assert features(out / "my.slide.geojson")[0]["properties"]["objectType"] == "annotation"
    segment(slide, pts, out, options=SegmentOptions(progress=False, device="cpu"), models=Models(nuclei=disk_model(5.5)), stem="custom")
    assert "custom.geojson" in files_in(out)


# --------------------------------------------------------------------------------------------
# 9. the embedded model (it ships: a missing file is a failure, never a skip)
# --------------------------------------------------------------------------------------------


def test_embedded_model_on_the_nuclick_demo(shared_data, tmp_path):
    from nuclick_wsi.model.weights import default_weights_path

    assert default_weights_path().is_file(), f"the embedded default model {default_weights_path()} is missing"
    img = shared_data / "nuclick-demo" / "test_img.png"
    pts = shared_data / "nuclick-demo" / "test_img.csv"
    out = tmp_path / "out"
    report = segment(img, pts, out, options=SegmentOptions(progress=False, mpp=0.25)).report
    assert report["totals"]["clicks"] == 84
    assert report["totals"]["segmented"] >= 80
    areas = [r["area_px"] for r in report["clicks"] if r["status"] == "segmented"]
    assert all(20 <= a <= 2000 for a in areas), sorted(areas)[:3] + sorted(areas)[-3:]
    assert is_complete(out / "test_img.labels.zarr")
