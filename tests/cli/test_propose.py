"""``nuclick-wsi propose`` end to end on a small generated slide (stand-in detector as a real checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nuclick_wsi.cli.main import main
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.io.annotations.qupath import load_geojson, measurements_of
from nuclick_wsi.model.weights import save_checkpoint
from tests.helpers import DiskNet, SpotNet, disk_model, spot_detector, spot_slide_rgb, write_tiff_slide

SPOTS = [(300, 300), (420, 310), (700, 650), (1000, 380), (1180, 900)]


@pytest.fixture(autouse=True)
def stand_in_archs(monkeypatch):
    import nuclick_wsi.model.weights as weights

    real = weights.build_network
    fakes = {"test-spot": SpotNet, "test-disk": DiskNet}
    monkeypatch.setattr(weights, "build_network",
                        lambda arch, args=None: fakes[arch](**(args or {})) if arch in fakes else real(arch, args))


@pytest.fixture
def files(tmp_path):
    rgb = spot_slide_rgb(1400, 1100, SPOTS, tissue=[(150, 150, 1300, 1000)])
    slide = write_tiff_slide(tmp_path / "slide.tif", 1400, 1100, 0.25, rgb=rgb)
    det = spot_detector()
    save_checkpoint(tmp_path / "spot.pt", det.net, "test-spot", {}, det.metadata)
    disk = disk_model()
    save_checkpoint(tmp_path / "disk.pt", disk.net, "test-disk", {}, disk.metadata)
    return slide, tmp_path / "spot.pt", tmp_path / "disk.pt"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_propose_then_segment(tmp_path, files):
    slide, spot, disk = files
    out = tmp_path / "out"
    r = cli("propose", slide, "-o", out, "--weights", spot, "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    path = out / "slide.proposals.geojson"
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    prompts = read_prompts(path)  # our own reader: the file is a clicks file
    xy = np.array([(c.x, c.y) for c in prompts.clicks])
    assert len(xy) == len(SPOTS)
    assert all(c.class_name == "Proposed" for c in prompts.clicks)
    assert np.abs(np.sort(xy[:, 0]) - np.sort([s[0] for s in SPOTS])).max() < 3
    obj, where = load_geojson(path)
    feats = obj["features"]
    assert {f["properties"]["objectType"] for f in feats} == {"annotation"}
    assert {f["geometry"]["type"] for f in feats} == {"Point"}
    scores = [measurements_of(f)["Proposal score"] for f in feats]
    assert all(0.5 <= s <= 1 for s in scores)
    r = cli("segment", slide, "--points", path, "-o", tmp_path / "seg", "--weights", disk, "-q", "--no-qc")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "seg" / "slide.report.json").read_text())
    assert report["totals"]["segmented"] == len(SPOTS)


def test_roi_keeps_proposals_inside(tmp_path, files):
    slide, spot, _ = files
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"objectType": "annotation"},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [800, 0], [800, 1100], [0, 1100], [0, 0]]]}}]}))
    r = cli("propose", slide, "-o", tmp_path / "o", "--weights", spot, "-q", "--roi", roi)
    assert r.exit_code == 0, r.output
    xs = [c.x for c in read_prompts(tmp_path / "o" / "slide.proposals.geojson").clicks]
    assert len(xs) == 3 and max(xs) < 800


@pytest.mark.parametrize("content, message", [
    ('{"type": "FeatureCollection", "features": [', "roi.geojson"),
    (json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}),
     "roi.geojson: --roi needs area annotations"),
])
def test_bad_roi_is_one_line_naming_the_file(tmp_path, files, content, message):
    slide, spot, _ = files
    roi = tmp_path / "roi.geojson"
    roi.write_text(content)
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["propose", str(slide), "-o", str(out), "--weights", str(spot), "--roi", str(roi)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("Error:")
    assert not out.exists() or not list(out.iterdir())


def test_a_nuclick_model_is_not_a_detector(tmp_path, files):
    slide, _, disk = files
    r = CliRunner().invoke(main, ["propose", str(slide), "-o", str(tmp_path / "o"), "--weights", str(disk)])
    assert r.exit_code == 1 and "not a proposal detector" in r.output and str(disk) in r.output
