"""A run killed in the middle of ``commit_outputs`` (earlier report gone, outputs renamed one by one):
its marker keeps the outputs known as this tool's, so the next run replaces them instead of refusing
them as a user's files; a marker that is not ours proves nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from nuclick_wsi.errors import OutputError
from nuclick_wsi.outputs import commit
from nuclick_wsi.outputs.safety import commit_marker
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from tests.helpers import disk_model, write_tiff_slide


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (it is no Exception, so nothing catches it as an error)."""


def run(slide: Path, clicks: Path, out: Path, **kw):
    opts = SegmentOptions(progress=False, device="cpu", **{"formats": ("qupath", "asap"), **kw})
    return segment(slide, clicks, out, options=opts, models=Models(nuclei=disk_model(5.5)))


@pytest.fixture
def inputs(tmp_path):
    slide = write_tiff_slide(tmp_path / "S.tif", 384, 384, 0.25)
    clicks = tmp_path / "c.geojson"
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": {}}
             for x, y in ((100.5, 100.5), (250.5, 200.5))]
    clicks.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return slide, clicks


def kill_after_first_rename(monkeypatch):
    real = commit.replace_file
    calls = []

    def replace_then_die(tmp, final):
        if calls:
            raise Killed(final)
        calls.append(final)
        real(tmp, final)

    monkeypatch.setattr(commit, "replace_file", replace_then_die)


@pytest.mark.parametrize("earlier", [False, True])
def test_a_run_killed_mid_commit_is_followed_by_a_successful_run(inputs, tmp_path, monkeypatch, earlier):
    """``earlier``: over a complete run with its QC page (the report goes first, the page stays)."""
    out = tmp_path / "out"
    if earlier:
        run(*inputs, out, qc=True)
        assert (out / "S.qc.html").is_file()
    kill_after_first_rename(monkeypatch)
    with pytest.raises(Killed):
        run(*inputs, out)
    monkeypatch.undo()
    # what the kill leaves (the temporaries' owner, this process, is alive: pretend it is not there)
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith(".nuclick-tmp-"))
    assert "S.report.json" not in left and "S.labels.zarr" in left and commit_marker(out / "S.report.json").exists()
    res = run(*inputs, out)
    assert res.report["totals"]["segmented"] == 2 and (out / "S.report.json").is_file()
    assert not (out / "S.qc.html").exists()
    marker = json.loads(commit_marker(out / "S.report.json").read_text())  # kept: names what is ours now
    assert {"S.geojson", "S.labels.zarr", "S.report.json"} <= set(marker["names"])


def test_outputs_whose_report_was_deleted_are_still_ours_and_a_users_file_is_not(inputs, tmp_path):
    """Snakemake deletes a job's declared output (the report) before running it again, say after the clicks
    changed: the rerun must replace our other outputs, not refuse them; a user's file stays refused."""
    out = tmp_path / "out"
    first = run(*inputs, out, formats=("qupath",))
    (out / "S.report.json").unlink()
    again = run(*inputs, out, formats=("qupath",))
    assert again.report["totals"]["segmented"] == first.report["totals"]["segmented"] == 2
    (out / "S.report.json").unlink()
    (out / "S.xml").write_text("<mine/>")  # never written by us, whatever the marker says of S.geojson
    with pytest.raises(OutputError, match="S.xml exists and was not written by nuclick-wsi"):
        run(*inputs, out, formats=("qupath", "asap"))
    assert (out / "S.xml").read_text() == "<mine/>"


def test_a_marker_not_written_by_nuclick_wsi_proves_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "S.xml").write_text("<mine/>")
    commit_marker(out / "S.report.json").write_text(json.dumps({"names": ["S.xml"]}))
    with pytest.raises(OutputError, match="S.xml exists and was not written by nuclick-wsi"):
        run(*inputs, out)
    assert (out / "S.xml").read_text() == "<mine/>"


def test_an_output_edited_by_hand_and_kept_when_its_format_was_dropped_stays_ours(inputs, tmp_path):
    """qupath, edit S.geojson, asap (the edited file is kept, not removed), qupath again: replaced, not refused."""
    out = tmp_path / "out"
    run(*inputs, out, formats=("qupath",))
    edited = out / "S.geojson"
    edited.write_text(edited.read_text() + "\n")
    later = time.time() + 5
    os.utime(edited, (later, later))
    run(*inputs, out, formats=("asap",))
    assert edited.read_text().endswith("\n\n")  # kept: changed after the report that listed it
    run(*inputs, out, formats=("qupath",))
    assert not edited.read_text().endswith("\n\n")


def test_a_marker_left_after_the_outputs_were_deleted_proves_nothing(inputs, tmp_path):
    """rm -r OUT/S.* leaves the hidden marker: a user's S.xml saved there later is refused, not replaced."""
    out = tmp_path / "out"
    run(*inputs, out)
    for f in out.glob("S.*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    (out / "S.xml").write_text("<mine/>")
    with pytest.raises(OutputError, match="S.xml exists and was not written by nuclick-wsi"):
        run(*inputs, out)
    assert (out / "S.xml").read_text() == "<mine/>"


@pytest.mark.parametrize("name", ["S.review.geojson", "S.qc.html"])
def test_a_users_qc_named_file_beside_outputs_made_without_qc_is_refused(inputs, tmp_path, name):
    """No run wrote QC here: a user's S.review.geojson beside our outputs is theirs (--no-qc would delete it)."""
    out = tmp_path / "out"
    run(*inputs, out, qc=False)
    (out / name).write_text("mine")
    with pytest.raises(OutputError, match=f"{name} exists and was not written by nuclick-wsi"):
        run(*inputs, out, qc=False)
    assert (out / name).read_text() == "mine"
