"""``nuclick-wsi export-training`` through click's CliRunner: the summary line, one-line refusals, user folders kept."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from shapely.geometry import box

from nuclick_wsi.cli.main import main
from nuclick_wsi.training.export import NO_ROI
from tests.helpers import roi_file, segmented_blobs


@pytest.fixture
def segmented(tmp_path):
    return segmented_blobs(tmp_path)


def run(*args):
    return CliRunner().invoke(main, ["export-training", *map(str, args)])


def test_exports_with_roi_and_says_what_it_wrote(segmented, tmp_path):
    _, out = segmented
    res = run(out, "-o", tmp_path / "ds", "--roi", roi_file(tmp_path / "a.geojson", box(0, 0, 256, 256)), "-q")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    n = sum(t["instances"] for t in manifest["tiles"])
    assert res.output == f"{len(manifest['tiles'])} tiles, {n} labelled instances at 0.25 um/px in {tmp_path / 'ds'}\n"
    assert len(manifest["tiles"]) == (256 // 128) ** 2 and n > 5  # 256 model px = 128 level-0 px tiles


def test_refuses_without_roi_in_one_line_and_writes_nothing(segmented, tmp_path):
    _, out = segmented
    before = sorted(p.name for p in out.iterdir())
    res = run(out, "-o", tmp_path / "ds")
    assert res.exit_code == 1 and res.output == f"Error: {NO_ROI}\n"
    assert not (tmp_path / "ds").exists() and sorted(p.name for p in out.iterdir()) == before


def test_a_user_folder_is_never_replaced(segmented, tmp_path):
    _, out = segmented
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = run(out, "-o", mine, "--around-outlines")
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "mine: exists and is not an earlier export-training folder" in res.output
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1
    res = run(out, "-o", out / "ds", "--around-outlines")  # inside the segment outputs: refused
    assert res.exit_code == 1 and "would overwrite the segment outputs" in res.output and not (out / "ds").exists()


def test_a_folder_without_segment_reports_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run(tmp_path / "empty", "-o", tmp_path / "ds", "--roi", roi_file(tmp_path / "x.geojson", box(0, 0, 10, 10)))
    assert res.exit_code == 1 and res.output == f"Error: {tmp_path / 'empty'}: no S.report.json from `nuclick-wsi segment` here\n"
