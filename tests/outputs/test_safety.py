"""Issue 12: a user's files are never lost, outputs never half-written (cases 1, 2, 4, 5).

Crash safety (case 3: kill -9 / SIGTERM mid-run) is in test_crash.py; hostile inputs in
test_hostile_inputs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nuclick_wsi.cli.main import main
from nuclick_wsi.errors import NuclickError, OutputError, ResolutionError, SlideError
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from tests.helpers import disk_model, make_cohort, make_weights, write_tiff_slide

CLICKS = [(100.5, 100.5), (300.5, 200.5), (200.5, 300.5)]


def asap_clicks(path: Path, clicks=CLICKS) -> Path:
    dots = "".join(f'<Annotation Name="c{k}" Type="Dot" PartOfGroup="None" Color="#F4FA58"><Coordinates>'
                   f'<Coordinate Order="0" X="{x}" Y="{y}"/></Coordinates></Annotation>' for k, (x, y) in enumerate(clicks))
    path.write_text(f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{dots}</Annotations>'
                    "<AnnotationGroups/></ASAP_Annotations>\n")
    return path


def geojson_clicks(path: Path, clicks=CLICKS) -> Path:
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": {}}
             for x, y in clicks]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def run(slide, points, out, *formats, **kw):
    opts = SegmentOptions(progress=False, device="cpu", formats=formats or ("qupath",))
    return segment(slide, points, out, options=opts, models=Models(nuclei=disk_model(5.5)), **kw)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def d(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_tiff_slide(folder / "S.tif", 512, 512, 0.25)
    return folder


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


# --- case 1: inputs are sacred ------------------------------------------------------------------


def test_asap_layout_clicks_beside_the_slide_are_not_overwritten(d):
    """``<slide>.xml`` beside the slide, -o the same folder, --format asap: refused, file intact."""
    clicks = asap_clicks(d / "S.xml")
    before = snapshot(d)
    with pytest.raises(OutputError) as err:
        run(d / "S.tif", clicks, d, "asap")
    msg = str(err.value)
    assert "\n" not in msg and msg.count(str(clicks)) == 2  # names the output and the input (the same path)
    assert snapshot(d) == before


def test_geojson_clicks_named_like_the_output_are_refused(d, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    clicks = geojson_clicks(out / "S.geojson")
    link = tmp_path / "link.geojson"
    link.symlink_to(clicks)  # the real path counts, not the name given
    before = snapshot(out)
    for given in (clicks, link):
        with pytest.raises(OutputError, match="would overwrite the clicks file"):
            run(d / "S.tif", given, out)
    assert snapshot(out) == before


@pytest.mark.parametrize("qc", [True, False])
def test_clicks_named_like_the_qc_outputs_are_refused(d, tmp_path, qc):
    """Clicks saved as ``OUT/S.review.geojson`` (the review list's name): the QC report would overwrite
    them, and without it (``--no-qc``, the API's default) the clean-up of an earlier page would delete them."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("S.review.geojson", "S.qc.html"):
        clicks = geojson_clicks(out / name)
        before = snapshot(out)
        opts = SegmentOptions(progress=False, device="cpu", qc=qc)
        with pytest.raises(OutputError, match="would overwrite the clicks file"):
            segment(d / "S.tif", clicks, out, options=opts, models=Models(nuclei=disk_model(5.5)))
        assert snapshot(out) == before
        clicks.unlink()


def test_a_linked_output_folder_is_replaced_not_followed(d, tmp_path):
    """``S.labels.zarr`` moved elsewhere and linked back (a big store on another disk): a rerun
    replaces the link as it does a linked file, leaves what it points to alone, and does not fail
    at the end with the earlier report already deleted."""
    out = tmp_path / "out"
    clicks = geojson_clicks(tmp_path / "clicks.geojson")
    run(d / "S.tif", clicks, out)
    moved = tmp_path / "moved.zarr"
    (out / "S.labels.zarr").rename(moved)
    (out / "S.labels.zarr").symlink_to(moved)
    kept = snapshot(moved)
    res = run(d / "S.tif", clicks, out)
    assert res.report["totals"]["segmented"] == 3
    assert not (out / "S.labels.zarr").is_symlink() and (out / "S.report.json").is_file()
    assert snapshot(moved) == kept
    assert snapshot(out / "S.labels.zarr").keys() == kept.keys()


def test_clicks_with_another_formats_name_survive_stale_cleanup(d):
    """ASAP clicks ``S.xml`` and QuPath output into the same folder: the run works, S.xml stays."""
    clicks = asap_clicks(d / "S.xml")
    data = clicks.read_bytes()
    res = run(d / "S.tif", clicks, d, "qupath")
    assert res.report["totals"]["segmented"] == 3
    assert clicks.read_bytes() == data


def test_stale_cleanup_removes_only_what_this_tool_wrote(d, tmp_path):
    clicks = geojson_clicks(tmp_path / "clicks.geojson")
    out = tmp_path / "out"
    # a user's S.xml that no run wrote: kept
    out.mkdir()
    (out / "S.xml").write_text("<mine/>")
    run(d / "S.tif", clicks, out, "qupath")
    assert (out / "S.xml").read_text() == "<mine/>"
    (out / "S.xml").unlink()
    # an S.xml an earlier run wrote (its report lists it): removed when the format changes
    run(d / "S.tif", clicks, out, "asap")
    run(d / "S.tif", clicks, out, "qupath")
    assert not (out / "S.xml").exists() and (out / "S.geojson").is_file()
    # written by a run, then edited by the user (newer than the report): kept
    run(d / "S.tif", clicks, out, "asap")
    later = time.time() + 5
    os.utime(out / "S.xml", (later, later))
    run(d / "S.tif", clicks, out, "qupath")
    assert (out / "S.xml").is_file()


@pytest.mark.parametrize("name", ["S.xml", "S.geojson", "S.labels.zarr", "S.qc.html", "S.review.geojson", "S.report.json"])
def test_a_users_file_under_an_output_name_is_refused(d, tmp_path, name):
    """A pathologist's own ASAP annotations ``OUT/S.xml`` (or QuPath export, a zarr folder, a page) under an
    output's name: refused before any work, one line naming it, the folder byte-identical (nothing written)."""
    out = tmp_path / "out"
    out.mkdir()
    mine = out / name
    if name.endswith(".zarr"):
        mine.mkdir()
        (mine / ".zattrs").write_text("{}")
    else:
        mine.write_text('{"nuclick_wsi": "look-alike"}' if name.endswith(".json") else "<mine/>")
    before = snapshot(out)
    with pytest.raises(OutputError) as err:
        run(d / "S.tif", geojson_clicks(tmp_path / "c.geojson"), out, "qupath", "asap")
    assert str(err.value) == (f"{mine} exists and was not written by nuclick-wsi (no S.report.json or commit marker "
                              "of ours names it); move it or choose another -o / --stem")
    assert snapshot(out) == before


def test_our_own_outputs_are_replaced_also_after_a_hand_edit(d, tmp_path):
    """A rerun over our outputs (the QC page and review list of an earlier run too; our GeoJSON edited
    by hand since) replaces them; so does a run over the outputs of an older version (its report)."""
    clicks = geojson_clicks(tmp_path / "c.geojson")
    out = tmp_path / "out"
    segment(d / "S.tif", clicks, out, options=SegmentOptions(progress=False, device="cpu", qc=True, formats=("qupath", "asap")),
            models=Models(nuclei=disk_model(5.5)))
    assert (out / "S.qc.html").is_file() and (out / "S.review.geojson").is_file()
    ours = (out / "S.geojson").read_bytes()
    (out / "S.geojson").write_bytes(ours.replace(b"100.5", b"101.5"))  # an outline moved in an editor
    later = time.time() + 5
    os.utime(out / "S.geojson", (later, later))
    run(d / "S.tif", clicks, out, "qupath", "asap")
    assert (out / "S.geojson").read_bytes() == ours and not (out / "S.qc.html").exists()
    report = json.loads((out / "S.report.json").read_text())
    report["nuclick_wsi_version"] = "0.0.1"  # an older version: its report lists what it wrote, no marker
    (out / "S.report.json").write_text(json.dumps(report))
    (out / ".S.nuclick-commit.json").unlink()
    for name in ("S.qc.html", "S.review.geojson"):  # its QC files, not in the report
        (out / name).write_text("old page")
    run(d / "S.tif", clicks, out, "qupath", "asap")
    assert json.loads((out / "S.report.json").read_text())["nuclick_wsi_version"] != "0.0.1"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".S.nuclick-commit.json"]  # no temporaries


def test_output_folder_inside_a_folder_input_is_refused(tmp_path):
    slide_dir = tmp_path / "S.labels.zarr"  # an input that is a folder with an output's name
    slide_dir.mkdir()
    (slide_dir / "keep.txt").write_text("x")
    write_tiff_slide(tmp_path / "S.tif", 256, 256, 0.25)
    clicks = geojson_clicks(slide_dir / "c.geojson", [(10.5, 10.5)])
    with pytest.raises(OutputError, match="would overwrite the clicks file"):
        run(tmp_path / "S.tif", clicks, tmp_path)
    assert sorted(p.name for p in slide_dir.iterdir()) == ["c.geojson", "keep.txt"]


# --- case 2: output names are plain file names ----------------------------------------------------


def test_segment_stem_must_be_a_plain_name(tmp_path, d):
    victim = tmp_path / "b"
    victim.mkdir()
    (victim / "victim.xml").write_text("<victim/>")
    (victim / "victim.glands.zarr").mkdir()
    weights = make_weights(tmp_path / "w.pt")
    clicks = tmp_path / "c.csv"
    clicks.write_text("x,y\n100,100\n")
    before = snapshot(tmp_path)
    a = tmp_path / "a"
    for stem in ("../b/victim", "..", str(victim / "victim"), "sub\\x", ".hidden"):
        res = cli("segment", d / "S.tif", "-p", clicks, "-o", a, "--stem", stem, "--weights", weights, "-q",
                  "--device", "cpu", "--precision", "fp32")
        assert res.exit_code == 1, (stem, res.output)
        assert "Error: output stem" in res.output and "\n" not in res.output.strip(), res.output
    assert snapshot(tmp_path) == before


def test_qupath_and_batch_use_the_same_stem_rule():
    from nuclick_wsi.workflows.cohort.manifest import manifest_stem_problem as batch_rule
    from nuclick_wsi.outputs.safety import stem_problem

    for stem in ("a", "slide 1.svs", "../x", "/abs", "a/b", "a\\b", "..", ".x", "a\x01"):
        assert (batch_rule(stem) is None) == (stem_problem(stem) is None), stem


# --- case 5 ---------------------------------------------------------------------------------------


def test_one_mpp_range_for_segment_batch_and_readers(d, tmp_path):
    from nuclick_wsi.workflows.cohort.manifest import read_manifest
    from nuclick_wsi.io.slides.registry import open_slide

    clicks = geojson_clicks(tmp_path / "c.geojson")
    with pytest.raises(ResolutionError, match="outside the plausible"):
        segment(d / "S.tif", clicks, tmp_path / "o", models=Models(nuclei=disk_model()), options=SegmentOptions(mpp=1e6, progress=False))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ResolutionError):
        open_slide(d / "S.tif", mpp=30.0)
    assert open_slide(d / "S.tif", mpp=22.0).mpp == 22.0  # within the readers' range ...
    man = tmp_path / "m.csv"
    man.write_text(f"slide,points,mpp\n{d / 'S.tif'},{clicks},22\n")
    assert read_manifest(man).rows[0].mpp == 22.0  # ... so within batch's too
    man.write_text(f"slide,points,mpp\n{d / 'S.tif'},{clicks},30\n")
    with pytest.raises(NuclickError, match="outside the plausible"):
        read_manifest(man)


def test_cli_accepts_a_slide_folder_and_the_readers_decide(tmp_path):
    zarr = tmp_path / "S.ome.zarr"
    zarr.mkdir()
    (zarr / ".zattrs").write_text("{}")
    (zarr / ".zgroup").write_text('{"zarr_format": 2}')
    clicks = geojson_clicks(tmp_path / "c.geojson")
    res = cli("segment", zarr, "-p", clicks, "-o", tmp_path / "o", "-q")
    assert res.exit_code == 1, res.output  # not click's "is a directory" usage error (2)
    assert f"cannot open slide {zarr}" in res.output and "OME-Zarr" in res.output


def test_a_geojson_scalar_is_a_geojson_error(tmp_path):
    from nuclick_wsi.io.annotations import read_prompts

    for text in ("42", '"clicks"', "null", "true"):
        path = tmp_path / "c.geojson"
        path.write_text(text + "\n")
        with pytest.raises(NuclickError, match=rf"{path}: not GeoJSON"):
            read_prompts(path)


def _assert_truncated(cut: Path) -> None:
    from nuclick_wsi.io.slides.registry import open_slide

    with pytest.raises(SlideError) as err:
        open_slide(cut, mpp=0.25)
    msg = str(err.value)
    assert msg.startswith(f"cannot open slide {cut}: truncated TIFF") and "\n" not in msg, msg


def test_truncated_tiff_names_the_file(tmp_path):
    full = write_tiff_slide(tmp_path / "full.tif", 1024, 1024, 0.25)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # image data past the end
    _assert_truncated(cut)
    svs_like = tmp_path / "cut.svs"  # the first image directory past the end (SVS keep theirs at the back)
    svs_like.write_bytes(b"II*\0" + (1_000_000).to_bytes(4, "little") + bytes(5000))
    _assert_truncated(svs_like)


def test_truncated_svs_names_the_file(tmp_path, shared_data):
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    for size in (100_000, 1_500_000):
        cut = tmp_path / f"cut{size}.svs"
        cut.write_bytes(svs.read_bytes()[:size])
        _assert_truncated(cut)


def test_full_disk_is_refused_before_any_work(d, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nuclick_wsi.outputs import safety

    clicks = geojson_clicks(tmp_path / "c.geojson")
    out = tmp_path / "out"
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(OutputError, match=f"output folder {out}: 0.0 MiB free, the outputs need about"):
        run(d / "S.tif", clicks, out)
    assert list(out.iterdir()) == []


def test_full_disk_while_writing_the_qc_page(d, tmp_path, monkeypatch):
    """The QC page (about 2 MB: an overview picture) is written after the outputs: a disk that fills up
    there stops with the one-line folder error, and the free-space check before the run counts the page."""
    import errno
    from types import SimpleNamespace

    from nuclick_wsi.outputs import safety

    clicks = geojson_clicks(tmp_path / "c.geojson")
    out = tmp_path / "out"
    qc = SegmentOptions(progress=False, device="cpu", qc=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    segment(d / "S.tif", clicks, out, options=qc, models=Models(nuclei=disk_model(5.5)))
    assert (out / "S.qc.html").is_file() and (out / "S.review.geojson").is_file()
    monkeypatch.setattr("nuclick_wsi.pipeline.write_qc", full)
    with pytest.raises(OutputError, match=f"output folder {out}: no space left on device"):
        segment(d / "S.tif", clicks, out, options=qc, models=Models(nuclei=disk_model(5.5)))
    assert not [p for p in out.iterdir() if p.name.startswith(".nuclick-tmp")]
    # the earlier run's page and review list would show other outlines than the ones now written
    assert not (out / "S.qc.html").exists() and not (out / "S.review.geojson").exists()
    assert (out / "S.report.json").is_file()
    monkeypatch.undo()
    segment(d / "S.tif", clicks, out, options=qc, models=Models(nuclei=disk_model(5.5)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nuclick_wsi.pipeline.write_qc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        segment(d / "S.tif", clicks, out, options=qc, models=Models(nuclei=disk_model(5.5)))
    assert not (out / "S.qc.html").exists() and not (out / "S.review.geojson").exists()
    monkeypatch.undo()
    without = safety.expected_bytes(3, ("qupath",), 1)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: SimpleNamespace(free=without + 1))
    segment(d / "S.tif", clicks, out, options=replace(qc, qc=False), models=Models(nuclei=disk_model(5.5)))
    with pytest.raises(OutputError, match="the outputs need about"):
        segment(d / "S.tif", clicks, out, options=qc, models=Models(nuclei=disk_model(5.5)))


def test_batch_summary_never_overwrites_the_manifest(tmp_path):
    from nuclick_wsi.workflows.cohort import BatchOptions, run_batch

    manifest = make_cohort(tmp_path, n=1, clicks=2, name="batch-summary.csv")
    before = manifest.read_bytes()
    with pytest.raises(OutputError, match=f"would overwrite the manifest {manifest}"):
        run_batch(manifest, tmp_path, BatchOptions(segment=SegmentOptions(progress=False)))
    assert manifest.read_bytes() == before


# --- case 3 (unit): temporaries carry their owner; only those of gone owners are removed --------------


def test_only_temporaries_of_gone_owners_are_removed(tmp_path):
    from nuclick_wsi._util.fs import HOST, TMP_MARK, cleanup_temporaries, parse_temporary, temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "mine": temp_name("S.geojson"),
            "live": f"{TMP_MARK}0123abcd.{live.pid}@{HOST}~S.xml",
            "dead": f"{TMP_MARK}0123abcd.{dead.pid}@{HOST}~S.labels.zarr",
            "foreign": f"{TMP_MARK}0123abcd.{dead.pid}@other-host.example~S.parquet",
            "foreign-old": f"{TMP_MARK}0123abcd.1@other-host.example~S.report.json",
            "legacy-old": f"{TMP_MARK}0123abcd-S.geojson.gz",
        }
        for key, name in names.items():
            (tmp_path / name).mkdir() if name.endswith(".zarr") else (tmp_path / name).write_text(key)
        (tmp_path / "S.geojson").write_text("an output")
        old = time.time() - 3 * 24 * 3600
        for key in ("foreign-old", "legacy-old"):
            os.utime(tmp_path / names[key], (old, old))
        removed = {p.name for p in cleanup_temporaries(tmp_path)}
        assert removed == {names["dead"], names["foreign-old"], names["legacy-old"]}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["S.geojson", names["mine"], names["live"], names["foreign"]])
        info = parse_temporary(f"{TMP_MARK}0123abcd.7@h~{names['live']}")  # a temporary of a temporary
        assert (info.name, info.pid, info.host) == ("S.xml", 7, "h")
    finally:
        live.kill()
        live.wait()
