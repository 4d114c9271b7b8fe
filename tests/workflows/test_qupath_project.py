"""QuPath projects (nuclick_wsi.workflows.qupath_project, `nuclick-wsi qupath run`), the Groovy scripts, --roi,
and OpenSlide bounds as a QuPath user meets them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point, box
from click.testing import CliRunner
from tests.helpers import (OPENSLIDE, ROOT, dark_model, disk_model, entry, point_feature, write_clicks,
                           write_leica_scn, write_project, write_tiff_slide)

from nuclick_wsi.workflows import qupath_project as qp
from nuclick_wsi.io.annotations import read_prompts, read_qupath_polygons, write_qupath
from nuclick_wsi.cli.main import main
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.guidance.clicks import roi_reasons
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.records import Click, Instance, Prompts

SCRIPTS = ROOT / "workflows" / "qupath"
BIOFORMATS = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"


# --------------------------------------------------------------------------------------------
# fixtures: QuPath-shaped projects


@pytest.fixture
def two_images(tmp_path):
    """A project of two generated slides, one in a folder and file with spaces and brackets."""
    images = tmp_path / "my images"
    images.mkdir()
    a = write_tiff_slide(images / "slide one (2).tif", 512, 384, 0.25)
    b = write_tiff_slide(images / "b.tif", 400, 300, 0.25)
    proj = write_project(tmp_path / "project", [entry(a, a.name, size=(512, 384), entry_id=1),
                                                entry(b, b.name, size=(400, 300), entry_id=2)])
    write_clicks(proj, a.name, [point_feature(100.5, 100.5, "Tumor"), point_feature(300, 200)])
    write_clicks(proj, b.name, [{"type": "Feature", "geometry": {"type": "MultiPoint",
                                                                 "coordinates": [[50, 50], [150, 60], [390, 290]]},
                                 "properties": {"objectType": "annotation"}}])
    return proj, a, b


# --------------------------------------------------------------------------------------------
# names and project files


@pytest.mark.parametrize("name, expected", [
    ("MTA3-8_GPC3 (2).svs", "MTA3-8_GPC3 (2).svs"),
    ("a:b/c\\d.svs", "a_b_c_d.svs"),
    ('x*?"<>|y', "x_y"),
    ("tab\tand\nnewline", "tab_and_newline"),
    ("Ärger é.ndpi", "Ärger é.ndpi"),
    ("::", "_"),
    ("", "unnamed"),
    ("   ", "unnamed"),
])
def test_safe_name(name, expected):
    assert qp.safe_name(name) == expected


def test_read_project_as_qupath_writes_it(tmp_path):
    (tmp_path / "with space").mkdir()
    slide = write_tiff_slide(tmp_path / "with space" / "a b (2).tif", 64, 64, 0.25)
    entries = [
        entry(slide, "a b (2).tif", size=(64, 64)),
        entry(None, "win.svs", uri="file:/D:/Slides/win%20dows.svs", provider=BIOFORMATS, args=["--series", "0"]),
        entry(None, "omero", uri="https://omero.example.org/webclient/?show=image-1", entry_id=3),
        entry(slide, "rotated", builder_type="rotated", entry_id=4),
        {"serverBuilder": {"builderType": "pyramidize",
                           "builder": entry(slide, "x")["serverBuilder"]}, "entryID": 5, "imageName": "pyr"},
        {"serverBuilder": entry(slide, "meta name")["serverBuilder"], "entryID": 6},  # no imageName
    ]
    proj = qp.read_project(write_project(tmp_path / "p", entries))
    assert proj.version == "0.6.0" and len(proj.images) == 6
    a, win, omero, rot, pyr, noname = proj.images
    assert a.path == slide and a.path.exists() and a.provider == OPENSLIDE and a.size == (64, 64) and a.mpp == 0.25
    assert a.problem is None and a.file_name == "a b (2).tif" and a.entry_id == "1"
    assert win.args == ("--series", "0") and win.problem is None
    assert str(win.path).endswith("win dows.svs") and not win.path.exists()
    assert "local slide files" in omero.problem
    assert "'rotated'" in rot.problem
    assert pyr.problem is None and pyr.path == slide and pyr.name == "pyr"
    assert noname.name == "meta name"
    # the folder works as well as the file
    assert qp.read_project(tmp_path / "p").file == proj.file


def test_moved_project_finds_its_images(tmp_path):
    """Like QuPath, a project moved with its images resolves them relative to where it was saved."""
    new = tmp_path / "new place"
    (new / "images").mkdir(parents=True)
    slide = write_tiff_slide(new / "images" / "s 1.tif", 64, 64, 0.25)
    old_uri = "file:/old/place/images/s%201.tif"
    proj = qp.read_project(write_project(new, [entry(None, "s 1.tif", uri=old_uri)],
                                         uri="file:/old/place/project.qpproj"))
    assert proj.images[0].path == slide
    # a Windows project moved to Linux/macOS
    proj = qp.read_project(write_project(new, [entry(None, "s 1.tif", uri="file:/C:/Users/me/proj/images/s%201.tif")],
                                         uri="file:/C:/Users/me/proj/project.qpproj"))
    assert proj.images[0].path == slide


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ('{"images": [', "broken JSON at line 1"),
    ("[1, 2]", "expected a JSON object"),
    ('{"images": {"a": 1}}', "'images' is dict, not a list"),
    ('{"images": [3]}', "images[0] is not a JSON object"),
])
def test_malformed_project_files(tmp_path, content, message):
    path = tmp_path / "project.qpproj"
    path.write_text(content)
    with pytest.raises(qp.ProjectError, match=re.escape(message)) as err:
        qp.read_project(path)
    assert str(path) in str(err.value)
    result = CliRunner().invoke(main, ["qupath", "run", str(path), "-q"])
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "nuclick").exists()  # nothing written


def test_missing_project_file(tmp_path):
    with pytest.raises(qp.ProjectError, match="project file not found"):
        qp.read_project(tmp_path)


# --------------------------------------------------------------------------------------------
# the frame rule


def _img(provider=OPENSLIDE, args=(), size=None):
    return qp.ProjectImage(index=0, name="x", file_name="x", provider=provider, args=tuple(args), size=size)


@pytest.mark.parametrize("image, expected", [
    (_img(), True),  # OpenSlide crops to the bounds
    (_img(provider="qupath.lib.images.servers.OpenslideServerBuilder"), True),  # QuPath 0.2 class name
    (_img(args=["--no-crop"]), False),
    (_img(provider=BIOFORMATS, args=["--series", "0"]), False),  # no size: Bio-Formats knows no bounds
    (_img(provider=BIOFORMATS, size=(256, 192)), True),  # the project's image is the bounds' size
    (_img(provider=BIOFORMATS, size=(400, 320)), False),
    (_img(provider="qupath.lib.images.servers.ImageIoImageServerBuilder"), False),
])
def test_bounds_rule(image, expected):
    use, why = qp.bounds_rule(image, cropped=(256, 192), full=(400, 320), offset=(40, 60))
    assert use is expected and why


def test_bounds_rule_without_bounds():
    assert qp.bounds_rule(_img(args=["--no-crop"]), (64, 64), (64, 64), (0, 0))[0] is True


# --------------------------------------------------------------------------------------------
# running a project


def test_project_runs_end_to_end_and_skips_on_rerun(two_images):
    proj, a, b = two_images
    lines = []
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False), log=lines.append)
    assert [o.status for o in run.images] == ["segmented", "segmented"], [o.message for o in run.images]
    assert len(lines) == 2 and "2 of 2 clicks segmented" in lines[0]
    results = proj.parent / "nuclick" / "results"
    for name, n in ((a.name, 2), (b.name, 3)):
        polys = read_qupath_polygons(results / f"{name}.geojson")
        assert len(polys) == n
        assert all(qp.RESULT_MARKER in p["measurements"] for p in polys)  # what import_results.groovy removes
        assert all(p["object_type"] == "detection" for p in polys)
        assert (results / f"{name}.labels.zarr").is_dir() and (results / f"{name}.report.json").is_file()
    polys = read_qupath_polygons(results / f"{a.name}.geojson")
    assert polys[0]["class_name"] == "Tumor" and polys[0]["geometry"].contains(Point(100.5, 100.5))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["counts"] == {"segmented": 2} and summary["images"][0]["name"] == a.name

    # rerun: complete results made with the same model and options are skipped
    run = qp.run_project(proj, models=Models(nuclei=disk_model()))
    assert [o.status for o in run.images] == ["complete", "complete"]
    # clicks changed after the results: that image is redone; --force redoes everything
    clicks_b = proj.parent / "nuclick" / "clicks" / f"{b.name}.geojson"
    later = time.time() + 5
    os.utime(clicks_b, (later, later))
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert [o.status for o in run.images] == ["complete", "segmented"]
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False), force=True)
    assert [o.status for o in run.images] == ["segmented", "segmented"]


def test_project_rerun_redoes_images_asked_for_something_else(two_images):
    """``qupath run`` with other weights, object type, formats, frame, --qc or --full redoes complete
    results and says why (was: skipped until --force); device and batch size do not."""
    proj, a, b = two_images
    lines: list[str] = []

    def again(models=None, **kw):
        lines.clear()
        run = qp.run_project(proj, models=models or Models(nuclei=disk_model()),
                             options=SegmentOptions(progress=False, **kw), log=lines.append)
        return [o.status for o in run.images]

    assert again() == ["segmented", "segmented"]
    assert again(device="cpu", batch_size=3, precision="fp32") == ["complete", "complete"]
    other = disk_model()
    other.net.dummy.data -= 1.0
    for kw, why in (({"models": Models(nuclei=other)}, "model weights changed"),
                    ({"object_type": "annotation"}, "object type changed"),
                    ({"formats": ("qupath", "geoparquet")}, "formats changed"),
                    ({"mpp": 0.3}, "slide um/px (--mpp or the manifest's) changed"),
                    ({"tta": True}, "test-time augmentation changed")):
        assert again(**kw) == ["segmented", "segmented"], kw
        assert lines[0].startswith(f"{a.name}: segmented: redone: {why}; 2 of 2 clicks segmented"), lines
        assert again(**kw) == ["complete", "complete"], kw
        assert again() == ["segmented", "segmented"] and f"redone: {why}; " in lines[1], lines
    assert again(qc=True) == ["segmented", "segmented"] and "redone: QC page missing (--qc); " in lines[0]
    assert again() == ["complete", "complete"]  # --no-qc after --qc: done
    assert again(full=True) == ["segmented", "segmented"] and "redone: --full; " in lines[0]
    # the frame is the project's rule unless forced: forcing the other frame redoes
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False),
                         bounds_offset=False)
    assert [o.status for o in run.images] == ["segmented", "segmented"] and "bounds offset changed" in run.images[0].message
    # a report of an older nuclick-wsi (no "asked" section): complete results are done, whatever the options
    report = proj.parent / "nuclick" / "results" / f"{a.name}.report.json"
    data = json.loads(report.read_text())
    del data["asked"]
    report.write_text(json.dumps(data))
    assert again(object_type="annotation")[0] == "complete"


def test_clicks_exported_again_during_the_run_are_not_taken_as_done(two_images, monkeypatch):
    """The user exports an image's clicks again while ``qupath run`` is segmenting it (the file is
    newer than what the run read, older than the results it writes): the next run redoes that image
    instead of calling the results, made from the earlier clicks, complete."""
    from nuclick_wsi import pipeline

    proj, a, b = two_images
    clicks_a = proj.parent / "nuclick" / "clicks" / f"{a.name}.geojson"
    read = pipeline.read_prompts

    def read_then_export_again(path, **kw):
        prompts = read(path, **kw)
        if Path(path) == clicks_a:  # the export lands after the run read the file
            data = json.loads(clicks_a.read_text())
            data["features"].append(point_feature(150.5, 150.5, "Tumor"))
            clicks_a.write_text(json.dumps(data))
        return prompts

    monkeypatch.setattr(pipeline, "read_prompts", read_then_export_again)
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert [o.totals["clicks"] for o in run.images] == [2, 3]
    monkeypatch.undo()
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert [o.status for o in run.images] == ["segmented", "complete"]
    assert run.images[0].totals["clicks"] == 3


def test_one_failing_image_does_not_stop_the_others(two_images):
    proj, a, b = two_images
    (proj.parent / "nuclick" / "clicks" / f"{a.name}.geojson").write_text('{"type": "FeatureCollection", "features": [')
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    (fa, fb) = run.images
    assert fa.status == "failed" and "broken JSON" in fa.message and a.name in fa.message
    assert fb.status == "segmented"
    results = proj.parent / "nuclick" / "results"
    assert not list(results.glob(f"{a.name}*")) and (results / f"{b.name}.geojson").is_file()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["counts"] == {"failed": 1, "segmented": 1}
    assert not [p for p in results.iterdir() if p.name.startswith(".nuclick-tmp")]


def test_missing_slide_no_clicks_and_duplicate_names(tmp_path):
    s = write_tiff_slide(tmp_path / "s.tif", 256, 256, 0.25)
    entries = [entry(tmp_path / "gone.tif", "gone.tif", entry_id=1),
               entry(s, "no clicks here", entry_id=2),
               entry(s, "a:b", entry_id=3), entry(s, "a/b", entry_id=4)]
    proj = write_project(tmp_path / "p", entries)
    for name in ("gone.tif", "a:b"):
        write_clicks(proj, name, [point_feature(10, 10)])
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    gone, none, ab1, ab2 = run.images
    assert gone.status == "failed" and "slide not found" in gone.message
    assert none.status == "no clicks"
    assert ab1.status == ab2.status == "failed" and "share the file name 'a_b'" in ab1.message


def test_project_mpp_is_used_when_the_file_has_none(tmp_path):
    s = write_tiff_slide(tmp_path / "nompp.tif", 256, 256, None)
    proj = write_project(tmp_path / "p", [entry(s, "nompp.tif", mpp=0.25, size=(256, 256))])
    write_clicks(proj, "nompp.tif", [point_feature(100, 100)])
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert run.images[0].status == "segmented", run.images[0].message
    assert "um/px 0.25 from the QuPath project" in run.images[0].bounds


def test_size_mismatch_is_an_error(tmp_path):
    s = write_tiff_slide(tmp_path / "s.tif", 256, 256, 0.25)
    proj = write_project(tmp_path / "p", [entry(s, "s.tif", provider=BIOFORMATS, args=["--series", "2"], size=(640, 480))])
    write_clicks(proj, "s.tif", [point_feature(100, 100)])
    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert run.images[0].status == "failed"
    assert "640 x 480" in run.images[0].message and "--series 2" in run.images[0].message


def test_cli_qupath_run_exit_status(two_images, tmp_path):
    import torch  # noqa: F401

    from nuclick_wsi.model.architectures.unet import LightUNet
    from nuclick_wsi.model.weights import save_checkpoint

    proj, a, b = two_images
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, LightUNet((8, 16, 32, 64)), "light-unet", {"widths": [8, 16, 32, 64]},
                    {"mpp": 0.25, "patch_size": 128, "task": "nuclei"})
    runner = CliRunner()
    ok = runner.invoke(main, ["qupath", "run", str(proj), "--weights", str(ckpt), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "2 segmented" in ok.output and "summary in" in ok.output
    again = runner.invoke(main, ["qupath", "run", str(proj.parent), "--weights", str(ckpt), "-q"])
    assert again.exit_code == 0 and "2 complete" in again.output
    (proj.parent / "nuclick" / "clicks" / f"{b.name}.geojson").write_text("")  # empty clicks file
    bad = runner.invoke(main, ["qupath", "run", str(proj), "--weights", str(ckpt), "--force", "-q"])
    assert bad.exit_code == 1
    assert "1 segmented, 1 failed" in bad.output and f"FAILED {b.name}" in bad.output and "empty file" in bad.output
    report = proj.parent / "nuclick" / "results" / f"{a.name}.report.json"
    assert json.loads(report.read_text())["rerun"]["mode"] == "incremental"  # the same clicks: all reused
    full = runner.invoke(main, ["qupath", "run", str(proj), "--weights", str(ckpt), "--force", "--full", "-q"])
    assert full.exit_code == 1 and json.loads(report.read_text())["rerun"]["why_full"] == "--full"


# --------------------------------------------------------------------------------------------
# OpenSlide bounds, as a QuPath user meets them


@pytest.fixture
def bounds_slide(tmp_path):
    """A Leica SCN with OpenSlide bounds (40, 60) and a dark nucleus at (100, 80) in QuPath's frame."""
    img = np.full((192, 256, 3), 235, np.uint8)
    yy, xx = np.mgrid[:192, :256]
    img[(xx - 100) ** 2 + (yy - 80) ** 2 <= 8 ** 2] = (70, 30, 110)
    return write_leica_scn(tmp_path / "bounds slide.scn", img, offset=(40, 60), canvas=(400, 320), mpp=0.5)


NUCLEUS = (100.5, 80.5)  # centre of the dark disk, QuPath frame
BOUNDS = (40, 60)


def _centroids(result) -> list[tuple[float, float]]:
    if not result.report["totals"]["segmented"]:
        return []
    return [p["geometry"].centroid.coords[0] for p in read_qupath_polygons(result.outputs["qupath"])]


def test_clicks_and_results_in_qupaths_frame(bounds_slide, tmp_path):
    clicks = tmp_path / "clicks.geojson"
    clicks.write_text(json.dumps({"type": "FeatureCollection", "features": [point_feature(*NUCLEUS)]}))
    opts = SegmentOptions(progress=False)
    got = segment(bounds_slide, clicks, tmp_path / "qupath frame", models=Models(nuclei=dark_model()), options=opts)
    (c,) = _centroids(got)
    assert c == pytest.approx(NUCLEUS, abs=0.05)  # the outline lands on the nucleus, in QuPath's frame
    assert got.report["totals"]["segmented"] == 1 and got.report["slide"]["bounds_offset"] == list(BOUNDS)
    poly = read_qupath_polygons(got.outputs["qupath"])[0]["geometry"]
    assert 180 < poly.area < 230  # the dark disk (pi 8^2 ~ 201 px), not a model-shaped blob

    # the same QuPath clicks read in OpenSlide's full frame miss the nucleus
    full = segment(bounds_slide, clicks, tmp_path / "full frame", models=Models(nuclei=dark_model()), options=SegmentOptions(progress=False, bounds_offset=False))
    assert full.report["totals"]["segmented"] == 0
    # clicks made in the full frame (QuPath with --no-crop) find it, shifted by the bounds
    shifted = tmp_path / "shifted.geojson"
    shifted.write_text(json.dumps(point_feature(NUCLEUS[0] + BOUNDS[0], NUCLEUS[1] + BOUNDS[1])))
    got = segment(bounds_slide, shifted, tmp_path / "full frame 2", models=Models(nuclei=dark_model()), options=SegmentOptions(progress=False, bounds_offset=False))
    (c,) = _centroids(got)
    assert c == pytest.approx((NUCLEUS[0] + BOUNDS[0], NUCLEUS[1] + BOUNDS[1]), abs=0.05)


def test_cli_no_bounds_offset_flag_reaches_the_reader(bounds_slide, tmp_path, monkeypatch):
    from nuclick_wsi import pipeline

    real = pipeline.segment  # the CLI imports it at call time: run it with the dark-blob model
    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: real(*a, **{**k, "models": Models(nuclei=dark_model())}))
    clicks = tmp_path / "c.geojson"
    clicks.write_text(json.dumps(point_feature(NUCLEUS[0] + BOUNDS[0], NUCLEUS[1] + BOUNDS[1])))
    res = CliRunner().invoke(main, ["segment", str(bounds_slide), "-p", str(clicks), "-o", str(tmp_path / "o"),
                                    "--no-bounds-offset", "-q"])
    assert res.exit_code == 0, res.output
    (poly,) = read_qupath_polygons(tmp_path / "o" / "bounds slide.geojson")
    assert poly["geometry"].centroid.coords[0] == pytest.approx((140.5, 140.5), abs=0.05)


@pytest.mark.parametrize("provider, args, size, frame", [
    (OPENSLIDE, [], (256, 192), "qupath"),
    (OPENSLIDE, ["--no-crop"], (400, 320), "full"),
    (BIOFORMATS, ["--series", "0"], (256, 192), "qupath"),  # Bio-Formats opens the SCN image itself
])
def test_project_follows_how_qupath_opened_the_slide(bounds_slide, tmp_path, provider, args, size, frame):
    proj = write_project(tmp_path / "p", [entry(bounds_slide, bounds_slide.name, provider=provider, args=args,
                                                size=size, mpp=0.5)])
    at = NUCLEUS if frame == "qupath" else (NUCLEUS[0] + BOUNDS[0], NUCLEUS[1] + BOUNDS[1])
    write_clicks(proj, bounds_slide.name, [point_feature(*at)])
    run = qp.run_project(proj, models=Models(nuclei=dark_model()), options=SegmentOptions(progress=False))
    out = run.images[0]
    assert out.status == "segmented" and out.totals["segmented"] == 1, (out.message, out.bounds)
    (poly,) = read_qupath_polygons(out.outputs["qupath"])
    assert poly["geometry"].centroid.coords[0] == pytest.approx(at, abs=0.05)
    # forcing the other frame misses the nucleus
    run = qp.run_project(proj, models=Models(nuclei=dark_model()), options=SegmentOptions(progress=False), force=True,
                         bounds_offset=frame != "qupath")
    assert run.images[0].totals["segmented"] == 0


# --------------------------------------------------------------------------------------------
# --roi


def test_roi_limits_the_clicks(tiff_slide, tmp_path):
    slide = tiff_slide(512, 384)
    square = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]]},
              "properties": {"objectType": "annotation", "classification": {"name": "Region*"}}}
    clicks = tmp_path / "c.geojson"
    clicks.write_text(json.dumps({"type": "FeatureCollection",
                                  "features": [square, point_feature(50, 50), point_feature(200, 100), point_feature(300, 300)]}))
    got = segment(slide, clicks, tmp_path / "o", models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False, roi=True))
    t = got.report["totals"]
    assert t["segmented"] == 2 and t["skipped_by_reason"] == {"outside the ROI": 1}  # the edge counts as inside
    assert got.report["clicks"][2]["reason"].startswith("outside the ROI")
    assert any("Polygon annotation is not a prompt" in s for s in got.report["points"]["not_prompts"])
    # without --roi every click is segmented; with --roi and no polygons, a clear error
    assert segment(slide, clicks, tmp_path / "o2", models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False)).report["totals"]["segmented"] == 3
    bare = tmp_path / "bare.geojson"
    bare.write_text(json.dumps(point_feature(50, 50)))
    with pytest.raises(NuclickError, match="no area annotations"):
        segment(slide, bare, tmp_path / "o3", models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False, roi=True))
    assert not (tmp_path / "o3").exists() or not list((tmp_path / "o3").iterdir())


def test_roi_from_real_asap_polygons(shared_data):
    """The Camelyon16 lesion outlines (real ASAP XML) as ROIs for clicks inside and outside them."""
    regions = read_prompts(shared_data / "annotations-samples" / "camelyon16_tumor_085_asap.xml").regions
    assert regions
    inside = regions[0].representative_point()
    minx, miny, _, _ = regions[0].bounds
    prompts = Prompts(clicks=[Click(inside.x, inside.y), Click(minx - 5000, miny - 5000)], regions=regions)
    reasons = roi_reasons(prompts, [None, None], "camelyon")
    assert reasons[0] is None and reasons[1].startswith("outside the ROI")
    with pytest.raises(NuclickError, match="none of its clicks lies inside"):
        roi_reasons(Prompts(clicks=[Click(minx - 5000, miny - 5000)], regions=regions), [None], "camelyon")


# --------------------------------------------------------------------------------------------
# the Groovy scripts: same folders, names and marker as the Python side


def _groovy_const(text: str, name: str) -> str:
    m = re.search(rf"def {name} = (\$/(.*?)/\$|'([^']*)')", text)
    assert m, f"{name} not found"
    return m.group(2) if m.group(2) is not None else m.group(3)


@pytest.mark.parametrize("script, folder", [("export_clicks.groovy", qp.CLICKS_DIR),
                                            ("import_results.groovy", qp.RESULTS_DIR)])
def test_scripts_match_the_python_side(script, folder):
    text = (SCRIPTS / script).read_text()
    assert _groovy_const(text, "RESULT_MARKER") == qp.RESULT_MARKER
    assert _groovy_const(text, "UNSAFE_FILENAME") == qp.UNSAFE_FILENAME
    assert _groovy_const(text, "EMPTY_NAME") == qp.EMPTY_NAME
    from nuclick_wsi.qc.review import REVIEW_MEASUREMENT

    assert _groovy_const(text, "REVIEW_MARKER") == REVIEW_MEASUREMENT  # imported by one, left out by the other
    if script == "import_results.groovy":  # the review list (nuclick_wsi.qc) is offered, off by default
        assert "def IMPORT_REVIEW = false" in text and "fileName + '.review.geojson'" in text
    paths = re.findall(r"buildFilePath\(PROJECT_BASE_DIR, ([^)]*)\)", text)
    assert paths == [", ".join(f"'{p}'" for p in folder)]
    assert "fileName + '.geojson'" in text and "getProjectEntry()" in text
    assert "out.trim().isEmpty() ? empty : out" in text  # safe_name's empty rule


def _groovy_env():
    exe = shutil.which("groovy")
    if exe is None:
        return None
    env = dict(os.environ)
    java = shutil.which("java")
    if "JAVA_HOME" not in env and java:
        env["JAVA_HOME"] = str(Path(os.path.realpath(java)).parents[1])
    return env


@pytest.mark.skipif(shutil.which("groovy") is None, reason="groovy not installed (the scripts need QuPath or Groovy)")
def test_scripts_round_trip_under_groovy(tmp_path):
    """export_clicks -> qupath run -> import_results (twice), with the scripts run by Groovy
    against a stand-in of QuPath's scripting API (tests/groovy/FakeQP.groovy)."""
    images = tmp_path / "imgs"
    images.mkdir()
    a = write_tiff_slide(images / "case 1; HE (2).tif", 256, 256, 0.25)
    b = write_tiff_slide(images / "b.tif", 256, 256, 0.25)
    names = [a.name, b.name]
    proj = write_project(tmp_path / "proj", [entry(a, a.name, entry_id=1), entry(b, b.name, entry_id=2)])
    line = {"roi": "line", "coords": [[10, 10], [30, 30]], "tag": "line"}
    user = [{"roi": "point", "coords": [[60.5, 60.5], [120, 150]], "tag": "clicks"},
            {"roi": "area", "coords": [[0, 0], [250, 0], [250, 250]], "tag": "roi"},
            {"kind": "detection", "roi": "area", "coords": [[1, 1], [2, 1], [2, 2]], "tag": "other detection"},
            {"kind": "detection", "roi": "area", "coords": [[1, 1], [2, 1], [2, 2]], "tag": "old nuclick",
             "measurements": {qp.RESULT_MARKER: 0.9}}]
    env = _groovy_env()

    def run_groovy(jobs):
        jf, of = tmp_path / "jobs.json", tmp_path / "out.json"
        jf.write_text(json.dumps(jobs))
        subprocess.run(["groovy", "-cp", str(ROOT / "tests" / "groovy"), str(ROOT / "tests" / "groovy" / "run_scripts.groovy"),
                        str(jf), str(of)], check=True, env=env, timeout=120, capture_output=True)
        return json.loads(of.read_text())

    base = str(proj.parent)
    export = str(SCRIPTS / "export_clicks.groovy")
    every = names + ["lines only", "x:y", "x/y"]
    out = run_groovy([{"script": export, "project": base, "image": n, "images": every, "objects": user} for n in names]
                     + [{"script": export, "project": base, "image": "lines only", "images": every,
                         "objects": user + [line]},
                        # two images whose names map to one file name: the export refuses
                        {"script": export, "project": base, "image": "x:y", "images": every, "objects": user}])
    assert all("2 clicks, 0 lines, 1 areas" in o["printed"] for o in out[:2]) and "1 lines" in out[2]["printed"]
    clicks = proj.parent / "nuclick" / "clicks"
    prompts = read_prompts(clicks / f"{qp.safe_name(a.name)}.geojson")
    assert len(prompts.clicks) == 2 and not prompts.squiggles and len(prompts.regions) == 1
    assert len(read_prompts(clicks / "lines only.geojson").squiggles) == 1  # lines go out as squiggles
    assert "ERROR" in out[3]["printed"] and not (clicks / "x_y.geojson").exists()
    (clicks / "lines only.geojson").unlink()

    run = qp.run_project(proj, models=Models(nuclei=disk_model()), options=SegmentOptions(progress=False))
    assert [o.status for o in run.images] == ["segmented", "segmented"], [o.message for o in run.images]

    job = {"script": str(SCRIPTS / "import_results.groovy"), "project": base, "image": a.name, "images": names,
           "objects": user}
    # import, then import again (e.g. after a rerun): results replace, never duplicate
    first, second = run_groovy([job, dict(job, objects="previous")])
    tags = [o["tag"] for o in first["objects"]]
    assert "old nuclick" not in tags and tags.count("imported") == 2
    assert {"clicks", "roi", "other detection"} <= set(tags) and first["updates"] == 1
    assert [o["tag"] for o in second["objects"]].count("imported") == 2
    assert "removed 2 earlier NuClick objects, imported 2" in second["printed"]


@pytest.mark.skipif(shutil.which("groovy") is None, reason="groovy not installed (the scripts need QuPath or Groovy)")
def test_export_leaves_out_an_imported_review_list(tmp_path):
    """The review list (IMPORT_REVIEW = true) brings annotations into QuPath: a Point at every click
    that gave no outline and a polygon around every doubtful outline. Exporting the clicks again
    (after adding a click, as the README says) must not turn them into clicks of class
    "NuClick review" and areas."""
    from nuclick_wsi.qc.review import REVIEW_MEASUREMENT

    a = write_tiff_slide(tmp_path / "a.tif", 64, 64, 0.25)
    proj = write_project(tmp_path / "proj", [entry(a, a.name, entry_id=1)])
    user = [{"roi": "point", "coords": [[20.5, 20.5]], "tag": "clicks"},
            {"roi": "point", "coords": [[40.5, 40.5]], "tag": "review point", "measurements": {REVIEW_MEASUREMENT: 0}},
            {"roi": "area", "coords": [[1, 1], [9, 1], [9, 9]], "tag": "review outline",
             "measurements": {REVIEW_MEASUREMENT: 3}}]
    jf, of = tmp_path / "jobs.json", tmp_path / "out.json"
    jf.write_text(json.dumps([{"script": str(SCRIPTS / "export_clicks.groovy"), "project": str(proj.parent),
                               "image": a.name, "images": [a.name], "objects": user}]))
    subprocess.run(["groovy", "-cp", str(ROOT / "tests" / "groovy"), str(ROOT / "tests" / "groovy" / "run_scripts.groovy"),
                    str(jf), str(of)], check=True, env=_groovy_env(), timeout=120, capture_output=True)
    assert "1 clicks, 0 lines, 0 areas" in json.loads(of.read_text())[0]["printed"]
    prompts = read_prompts(proj.parent / "nuclick" / "clicks" / f"{a.name}.geojson")
    assert [(c.x, c.y) for c in prompts.clicks] == [(20.5, 20.5)] and not prompts.regions


def test_result_marker_is_on_every_written_object(tmp_path):
    inst = Instance(label=1, uuid="3fa85f64-5717-4562-b3fc-2c963f66afa6", geometry=box(0, 0, 4, 4), area_px=16,
                    score=0.8)
    for kind in ("detection", "annotation", "cell"):
        path = write_qupath([inst], tmp_path / f"{kind}.geojson", object_type=kind)
        feat = json.loads(path.read_text())["features"][0]
        assert qp.RESULT_MARKER in feat["properties"]["measurements"] and feat["id"] == inst.uuid
