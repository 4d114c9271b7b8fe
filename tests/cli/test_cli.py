"""The ``nuclick-wsi segment`` command, through click's CliRunner (in-process).

The stand-in disk model travels as a real checkpoint file (arch ``test-disk``): only
``build_network`` is taught that architecture, so ``--weights`` goes through the real loader.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.helpers import DiskNet, disk_model, write_tiff_slide
from nuclick_wsi.cli.main import main
from nuclick_wsi.errors import OutputError
from nuclick_wsi.model.weights import save_checkpoint
from nuclick_wsi.store.labels import is_complete, open_labels


@pytest.fixture(autouse=True)
def disk_arch(monkeypatch):
    import nuclick_wsi.model.weights as weights

    real = weights.build_network

    def build(arch, arch_args=None):
        return DiskNet(**(arch_args or {})) if arch == "test-disk" else real(arch, arch_args)

    monkeypatch.setattr(weights, "build_network", build)


DISK_PT: Path | None = None  #: this test's disk checkpoint, the default of ``segment_args``


@pytest.fixture(autouse=True)
def disk_pt(tmp_path_factory, disk_arch):
    """A checkpoint of the disk model (radius 5.5 model px at 0.25 um/px)."""
    global DISK_PT
    m = disk_model(5.5)
    DISK_PT = tmp_path_factory.mktemp("weights") / "disk.pt"
    save_checkpoint(DISK_PT, m.net, "test-disk", {"radius": 5.5}, m.metadata)
    yield DISK_PT
    DISK_PT = None


@pytest.fixture
def case(tmp_path):
    """A 512 x 384 slide at 0.25 um/px, three clicks (one off the slide), an output folder path."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = tmp_path / "clicks.csv"
    pts.write_text("x,y,class\n100.5,100.5,Tumor\n300.5,200.5,Lymph\n900,10,Tumor\n")
    return slide, pts, tmp_path / "out"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def segment_args(slide, pts, out, *extra, weights=None):
    weights = weights or DISK_PT
    return ["segment", slide, "--points", pts, "-o", out, "--weights", weights, "--device", "cpu", *extra]


def files_in(folder: Path) -> list[str]:
    """The names in ``folder``, less the hidden commit marker (bookkeeping: tests/outputs/test_commit_marker.py)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".nuclick-commit.json")) if folder.exists() else []


def assert_one_line_error(result, *names):
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_segment_writes_outputs_and_says_what_it_did(case):
    slide, pts, out = case
    result = invoke(*segment_args(slide, pts, out))
    assert result.exit_code == 0, result.output
    assert files_in(out) == ["slide.geojson", "slide.labels.zarr", "slide.qc.html", "slide.report.json",
                             "slide.review.geojson"]
    assert "2 of 3 clicks segmented" in result.stderr
    assert "skipped 1: outside the slide" in result.stderr
    report = json.loads((out / "slide.report.json").read_text())
    assert [r["status"] for r in report["clicks"]] == ["segmented", "segmented", "skipped"]
    labels = open_labels(out / "slide.labels.zarr")[:]
    feats = {f["id"]: f for f in json.loads((out / "slide.geojson").read_text())["features"]}
    for r in report["clicks"][:2]:
        assert labels[math.floor(r["y"]), math.floor(r["x"])] == r["instance_id"] == r["index"] + 1
        assert feats[r["uuid"]]["properties"]["classification"]["name"] == r["class"]
    assert is_complete(out / "slide.labels.zarr")


def test_quiet_prints_nothing(case):
    slide, pts, out = case
    result = invoke(*segment_args(slide, pts, out, "-q"))
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_all_formats_cell_and_gzip(case):
    import geopandas as gpd

    slide, pts, out = case
    result = invoke(*segment_args(slide, pts, out, "-q", "--format", "qupath,asap,geoparquet",
                                  "--object-type", "cell", "--gzip"))
    assert result.exit_code == 0, result.output
    assert files_in(out) == ["slide.geojson.gz", "slide.labels.zarr", "slide.parquet", "slide.qc.html",
                             "slide.report.json", "slide.review.geojson", "slide.xml"]
    feats = json.loads(gzip.decompress((out / "slide.geojson.gz").read_bytes()))["features"]
    assert len(feats) == 2
    assert all(f["properties"]["objectType"] == "cell" and f["nucleusGeometry"] == f["geometry"] for f in feats)
    assert len(gpd.read_parquet(out / "slide.parquet")) == 2
    xml = (out / "slide.xml").read_text()
    assert 'PartOfGroup="Tumor"' in xml and '<Group Name="Lymph"' in xml


def test_unknown_format_is_a_usage_error(case):
    slide, pts, out = case
    result = invoke(*segment_args(slide, pts, out, "--format", "qupath,shapefile"))
    assert result.exit_code == 2
    assert "shapefile" in result.stderr
    assert files_in(out) == []


def test_stem_and_rerun(case):
    slide, pts, out = case
    assert invoke(*segment_args(slide, pts, out, "-q", "--stem", "S1")).exit_code == 0
    first = (out / "S1.geojson").read_bytes()
    assert "S1.qc.html" in files_in(out)
    assert invoke(*segment_args(slide, pts, out, "-q", "--stem", "S1", "--no-qc")).exit_code == 0
    assert (out / "S1.geojson").read_bytes() == first
    assert files_in(out) == ["S1.geojson", "S1.labels.zarr", "S1.report.json"]  # --no-qc: the earlier page goes


def test_real_checkpoint_through_the_cli(case, tmp_path):
    from nuclick_wsi.model.architectures.unet import LightUNet

    slide, pts, out = case
    torch.manual_seed(0)
    ckpt = tmp_path / "light.pt"
    save_checkpoint(ckpt, LightUNet((8, 16, 32)), "light-unet", {"widths": [8, 16, 32]},
                    {"mpp": 0.25, "task": "nuclei", "patch_size": 128})
    result = invoke(*segment_args(slide, pts, out, "-q", weights=ckpt))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "slide.report.json").read_text())
    assert report["model"]["arch"] == "light-unet" and report["model"]["source"] == str(ckpt)
    assert report["totals"]["clicks"] == 3 == len(report["clicks"])


# --- bad inputs: exit 1, one line naming the file, nothing in the output folder --------------


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_unreadable_slide(shared_data, case, name):
    _, pts, out = case
    result = invoke(*segment_args(shared_data / "slides" / name, pts, out, "-q"))
    assert_one_line_error(result, name)
    assert files_in(out) == []


def test_missing_points_file(case, tmp_path):
    slide, _, out = case
    result = invoke(*segment_args(slide, tmp_path / "nothere.csv", out, "-q"))
    assert_one_line_error(result, "nothere.csv")
    assert files_in(out) == []


def test_broken_json(case, tmp_path):
    slide, _, out = case
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection",\n  "features": [\n    {"type": "Feature"\n')
    result = invoke(*segment_args(slide, bad, out, "-q"))
    assert_one_line_error(result, "broken.geojson", "line")
    assert files_in(out) == []


def test_no_clicks(case, tmp_path):
    slide, _, out = case
    regions = tmp_path / "regions.geojson"
    regions.write_text(json.dumps({"type": "Feature", "properties": {"objectType": "annotation"},
                                   "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}))
    result = invoke(*segment_args(slide, regions, out, "-q"))
    assert_one_line_error(result, "regions.geojson", "no clicks")
    assert files_in(out) == []


def test_squiggles_without_a_gland_model(case, tmp_path):
    slide, _, out = case
    lines = tmp_path / "lines.geojson"
    lines.write_text(json.dumps({"type": "Feature", "properties": {},
                                 "geometry": {"type": "LineString", "coordinates": [[0, 0], [10, 10]]}}))
    result = invoke(*segment_args(slide, lines, out, "-q"))
    assert_one_line_error(result, "lines.geojson")
    assert files_in(out) == []


def test_all_clicks_outside(case, tmp_path):
    slide, _, out = case
    far = tmp_path / "far.csv"
    far.write_text("5000,5000\n-3,4\n")
    result = invoke(*segment_args(slide, far, out, "-q"))
    assert_one_line_error(result, "far.csv", "slide.tif")
    assert files_in(out) == []


def test_unknown_resolution_needs_mpp(case, tmp_path):
    _, pts, out = case
    slide = write_tiff_slide(tmp_path / "bare.tif", 512, 384, None)
    result = invoke(*segment_args(slide, pts, out, "-q"))
    assert_one_line_error(result, "bare.tif", "--mpp")
    assert files_in(out) == []
    result = invoke(*segment_args(slide, pts, out, "-q", "--mpp", "0.25"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bare.report.json").read_text())
    assert report["mpp"]["slide"] == 0.25 and report["totals"]["segmented"] == 2


def test_weights_that_do_not_fit(case, tmp_path):
    from nuclick_wsi.model.architectures.unet import LightUNet

    slide, pts, out = case
    wide = tmp_path / "wide.pt"
    save_checkpoint(wide, LightUNet((16, 32, 64, 128)), "light-unet", {"widths": [8, 16, 32, 64]}, {"mpp": 0.25})
    assert_one_line_error(invoke(*segment_args(slide, pts, out, "-q", weights=wide)), "wide.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    assert_one_line_error(invoke(*segment_args(slide, pts, out, "-q", weights=junk)), "junk.pt")
    assert_one_line_error(invoke(*segment_args(slide, pts, out, "-q", weights=tmp_path / "none.pt")), "none.pt")
    assert files_in(out) == []


def test_unwritable_output(case, tmp_path):
    slide, pts, _ = case
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # running as root: a folder below a regular file instead
            afile = tmp_path / "afile"
            afile.write_text("x")
            result = invoke(*segment_args(slide, pts, afile / "out", "-q"))
            assert_one_line_error(result, "output folder", "afile")
            assert afile.read_text() == "x"
        else:
            result = invoke(*segment_args(slide, pts, locked, "-q"))
            assert_one_line_error(result, "output folder", "locked")
            assert files_in(locked) == []
    finally:
        locked.chmod(0o700)


def test_failure_while_writing(case, monkeypatch):
    slide, pts, out = case

    def boom(*args, **kwargs):
        raise OutputError(f"cannot write {out}/slide.geojson: No space left on device")

    monkeypatch.setattr("nuclick_wsi.outputs.commit.write_qupath", boom)
    result = invoke(*segment_args(slide, pts, out, "-q"))
    assert_one_line_error(result, "slide.geojson", "No space")
    assert files_in(out) == []


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and "nuclick-wsi" in result.output
    result = invoke("segment", "--help")
    assert result.exit_code == 0
    for flag in ("--points", "--format", "--object-type", "--gzip", "--mpp", "--weights"):
        assert flag in result.output


def test_segment_ngff_05_writes_a_zarr_v3_label_store(case):
    slide, pts, out = case
    result = invoke(*segment_args(slide, pts, out, "--ngff", "0.5"))
    assert result.exit_code == 0, result.output
    store = out / "slide.labels.zarr"
    meta = json.loads((store / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    assert not (store / ".zgroup").exists() and is_complete(store)
    report = json.loads((out / "slide.report.json").read_text())
    r = report["clicks"][0]
    assert open_labels(store)[math.floor(r["y"]), math.floor(r["x"])] == r["instance_id"]
    assert invoke(*segment_args(slide, pts, out, "--ngff", "0.6")).exit_code == 2  # click refuses it


def test_tta_flag_reaches_the_predictor_and_the_report(case):
    slide, pts, out = case
    plain = invoke(*segment_args(slide, pts, out / "plain", "-q"))
    tta = invoke(*segment_args(slide, pts, out / "tta", "-q", "--tta"))
    assert plain.exit_code == 0 == tta.exit_code, tta.output
    rep_plain = json.loads((out / "plain" / "slide.report.json").read_text())
    rep_tta = json.loads((out / "tta" / "slide.report.json").read_text())
    assert "tta" not in rep_plain and "tta x4" not in rep_plain["device"]
    assert rep_tta["tta"]["flips"] == 4 and "tta x4" in rep_tta["device"]
    assert rep_tta["totals"]["segmented"] == rep_plain["totals"]["segmented"] == 2


def test_rerun_says_what_it_reused_and_full_starts_afresh(case):
    slide, pts, out = case
    assert invoke(*segment_args(slide, pts, out, "--no-qc")).exit_code == 0
    again = invoke(*segment_args(slide, pts, out, "--no-qc"))
    assert again.exit_code == 0, again.output
    assert "incremental rerun: 2 reused, 0 recomputed, 2 outlines kept without stitching" in again.stderr
    full = invoke(*segment_args(slide, pts, out, "--no-qc", "--full"))
    assert full.exit_code == 0 and "full run: --full" in full.stderr
    assert json.loads((out / "slide.report.json").read_text())["rerun"]["why_full"] == "--full"
