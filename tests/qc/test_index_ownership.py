"""``index.html`` (batch, qupath run, report): a user's own page of that name is refused before any work
and left as it is; a page write_index wrote is replaced."""

from __future__ import annotations

import pytest

from nuclick_wsi.errors import OutputError
from nuclick_wsi.pipeline import Models, SegmentOptions
from nuclick_wsi.qc import index_row, rebuild, refuse_foreign_index, write_index
from nuclick_wsi.workflows.cohort import BatchOptions, run_batch
from nuclick_wsi.workflows.qupath_project import run_project
from tests.helpers import disk_model, entry, make_cohort, point_feature, write_clicks, write_project, write_tiff_slide

MINE = "<html><body><h1>Our lab's slides</h1><table><tr><td>case 1</td></tr></table></body></html>\n"


def refused(index, call) -> None:
    index.write_text(MINE)
    before = sorted(p.name for p in index.parent.iterdir())
    with pytest.raises(OutputError) as err:
        call()
    assert str(err.value) == f"{index} exists and was not written by nuclick-wsi; move it or choose another -o"
    assert index.read_text() == MINE and sorted(p.name for p in index.parent.iterdir()) == before


def test_our_index_is_ours_a_users_is_not(tmp_path):
    write_index(tmp_path, [index_row(tmp_path, "S", "failed", error="x")])
    refuse_foreign_index(tmp_path)  # ours (an empty table too): replaced
    refused(tmp_path / "index.html", lambda: rebuild(tmp_path))


def test_batch_refuses_a_users_index_before_any_work(tmp_path):
    man = make_cohort(tmp_path, n=1, clicks=2, weights=False)
    out = tmp_path / "out"
    out.mkdir()
    refused(out / "index.html", lambda: run_batch(man, out, BatchOptions(segment=SegmentOptions(progress=False, qc=True)),
                                                  models=Models(nuclei=disk_model(5.5))))


def test_qupath_run_refuses_a_users_index_before_any_work(tmp_path):
    slide = write_tiff_slide(tmp_path / "S.tif", 256, 256, 0.5)
    proj = write_project(tmp_path / "project", [entry(slide, slide.name, size=(256, 256), entry_id=1, mpp=0.5)])
    write_clicks(proj, slide.name, [point_feature(50.5, 60.5)])
    results = proj.parent / "nuclick" / "results"
    results.mkdir(parents=True)
    refused(results / "index.html", lambda: run_project(proj, models=Models(nuclei=disk_model(5.5)),
                                                        options=SegmentOptions(progress=False, qc=True)))
