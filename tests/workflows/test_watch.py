"""Watching (nuclick_wsi.workflows.watch, `segment --watch`, `qupath run --watch`): one process reruns
incrementally when the clicks are exported again."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from queue import Empty, Queue
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import (NUCLICK, SUB_ENV, entry, grid_clicks, guided_model, ids_by_click, make_weights, outputs,
                           point_feature, write_clicks, write_clicks_csv, write_project, write_tiff_slide)
from nuclick_wsi.pipeline import Models, SegmentOptions
from nuclick_wsi.workflows.watch import file_signature, watch, watch_project, watch_segment

OPTS = SegmentOptions(progress=False, device="cpu", precision="fp32", batch_size=16, formats=("qupath",))


class Script:
    """A fake ``sleep``: at the k-th call, runs ``actions[k]`` (when given); ``done`` once all have run."""

    def __init__(self, actions: dict[int, callable], total: int) -> None:
        self.actions, self.total, self.calls = actions, total, 0

    def __call__(self, seconds: float) -> None:
        action = self.actions.get(self.calls)
        self.calls += 1
        if action is not None:
            action()

    def done(self) -> bool:
        return self.calls >= self.total


def touch_later(path: Path) -> None:
    """Make sure a rewrite gets a new modification time even on coarse-clock file systems."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_watch_runs_once_then_only_after_a_settled_change():
    # initial, two polls unchanged, a change seen while still changing (1 -> 2), settled (2, 2), quiet polls
    sigs = iter([0, 0, 0, 1, 2, 2, 2, 2])
    state = {"sig": 0}

    def signature():
        state["sig"] = next(sigs, None)
        return state["sig"]

    ran_at = []
    watch(signature, lambda: ran_at.append(state["sig"]), interval=0, settle=0,
          stop=lambda: state["sig"] is None, sleep=lambda s: None)
    assert ran_at == [0, 2]  # the first run, then one for the settled change (not one per change seen)


def test_ctrl_c_stops_the_watch_quietly_and_a_termination_is_raised_again():
    from nuclick_wsi.outputs.signals import Terminated

    def interrupted(exc):
        def sleep(seconds):
            raise exc
        return sleep

    said = []
    stats = watch(lambda: 0, lambda: None, sleep=interrupted(KeyboardInterrupt()), say=said.append)
    assert stats.runs == 1 and said == ["stopped watching"]
    with pytest.raises(Terminated):
        watch(lambda: 0, lambda: None, sleep=interrupted(Terminated(15)), say=said.append)
    assert said[-1] == "stopped watching (terminated)"

    def first_run():  # Ctrl-C during the first run stops the watch the same way
        raise KeyboardInterrupt

    assert watch(lambda: 0, first_run, say=said.append).runs == 1 and said[-1] == "stopped watching"


def test_a_failing_rerun_is_said_and_the_watch_goes_on(tmp_path):
    from nuclick_wsi.errors import NuclickError

    said, calls = [], []

    def run():
        calls.append(1)
        if len(calls) == 2:
            raise NuclickError(f"{tmp_path}/clicks.geojson: not valid JSON\nsecond line")
        if len(calls) == 3:  # say, the results file held by another program on Windows
            raise PermissionError(13, "Permission denied", str(tmp_path / "s.geojson"))

    stats = watch(lambda: len(calls), run, interval=0, settle=0, stop=lambda: len(calls) >= 4, say=said.append,
                  sleep=lambda s: None)
    assert (stats.runs, stats.failed) == (4, 2)
    assert said[0] == f"failed: {tmp_path}/clicks.geojson: not valid JSON (still watching)"
    assert said[1].startswith("failed: unexpected PermissionError: ") and said[1].endswith("(still watching)")


def test_watch_segment_reruns_incrementally_with_the_model_it_holds(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    clicks = grid_clicks(512, 384)
    pts = write_clicks_csv(tmp_path / "clicks.csv", clicks)
    out = tmp_path / "out"
    new = (300.37, 190.12, "A")
    bad_before = {}

    def add_click():
        write_clicks_csv(pts, clicks[:5] + [new] + clicks[5:])
        touch_later(pts)

    def break_file():
        bad_before.update(outputs(out))
        pts.write_text("x,y,class\nnot,a,number\n")
        touch_later(pts)

    results, said = [], []
    models = Models(nuclei=guided_model())
    made = []
    real_predictor = Models.predictor
    models.predictor = lambda *a, **k: made.append(p := real_predictor(models, *a, **k)) or p
    script = Script({0: add_click, 3: break_file}, total=6)
    stats = watch_segment(slide, pts, out, options=OPTS, models=models, interval=0.01, settle=0.01,
                          stop=script.done, say=said.append, on_result=results.append, sleep=script)
    assert (stats.runs, stats.failed) == (3, 1)
    first, second = results
    assert first.report["rerun"]["mode"] == "full"
    rerun = second.report["rerun"]
    assert rerun["mode"] == "incremental" and 0 < rerun["recomputed"] < len(clicks) // 2
    assert rerun["reused"] + rerun["recomputed"] == len(clicks) + 1
    old, now = ids_by_click(first.report), ids_by_click(second.report)
    assert all(now[k] == v for k, v in old.items()) and now[new][0] == len(clicks) + 1
    assert outputs(out) == bad_before  # the failed third run left the second's outputs as they were
    assert "incremental: " in said[2] and said[-1].startswith("failed: ") and str(pts) in said[-1]
    assert len(made) == 2 and made[0] is made[1]  # one predictor (network loaded, compiled once) for both runs


@pytest.fixture
def project(tmp_path):
    a = write_tiff_slide(tmp_path / "a.tif", 512, 384, 0.25)
    b = write_tiff_slide(tmp_path / "b.tif", 400, 300, 0.25)
    proj = write_project(tmp_path / "project", [entry(a, a.name, size=(512, 384), entry_id=1),
                                                entry(b, b.name, size=(400, 300), entry_id=2)])
    write_clicks(proj, a.name, [point_feature(100.5, 100.5, "Tumor"), point_feature(300, 200)])
    write_clicks(proj, b.name, [point_feature(50, 50), point_feature(150, 60)])
    return proj, a, b


def test_watch_project_redoes_only_the_image_whose_clicks_changed(project):
    proj, a, b = project

    def export_again():
        path = write_clicks(proj, b.name, [point_feature(50, 50), point_feature(150, 60), point_feature(250, 200)])
        touch_later(path)

    passes, said = [], []
    script = Script({0: export_again}, total=3)
    watch_project(proj, options=OPTS, models=Models(nuclei=guided_model()), interval=0.01, settle=0.01,
                  stop=script.done, say=said.append, on_run=passes.append, sleep=script)
    assert [[o.status for o in p.images] for p in passes] == [["segmented", "segmented"], ["complete", "segmented"]]
    again = passes[1].images[1]
    assert again.totals["segmented"] == 3
    report = (proj.parent / "nuclick" / "results" / f"{b.name}.report.json").read_text()
    assert '"mode": "incremental"' in report
    assert sum("b.tif: segmented" in line for line in said) == 2 and sum("a.tif" in line for line in said) == 1


def test_full_holds_until_a_run_succeeds(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    clicks = grid_clicks(512, 384)
    out = tmp_path / "out"
    models = Models(nuclei=guided_model())
    pts = write_clicks_csv(tmp_path / "clicks.csv", clicks)
    watch_segment(slide, pts, out, options=OPTS, models=models, stop=lambda: True)  # an earlier run's ids
    pts.write_text("x,y\nbroken,\n")  # the first run of the --full watch fails

    def fix():
        write_clicks_csv(pts, clicks[::-1])  # reversed: a fresh id table numbers them in this order
        touch_later(pts)

    results = []
    script = Script({0: fix}, total=3)
    stats = watch_segment(slide, pts, out, options=replace(OPTS, full=True), models=models, interval=0.01,
                          settle=0.01, stop=script.done, on_result=results.append, sleep=script)
    assert (stats.runs, stats.failed) == (2, 1)
    rerun = results[0].report["rerun"]
    assert rerun["mode"] == "full" and rerun["why_full"] == "--full"
    assert [r["instance_id"] for r in results[0].report["clicks"]] == list(range(1, len(clicks) + 1))


def test_watch_project_redoes_an_export_made_while_a_pass_ran(project, monkeypatch):
    """The results of a pass are newer than an export made during it; the next pass still redoes it."""
    import nuclick_wsi.pipeline as pipeline

    proj, a, b = project
    real, reads = pipeline.read_prompts, []

    def read_then_export(path, **kw):
        prompts = real(path, **kw)
        reads.append(Path(path).name)
        if len(reads) == 1:  # the user exports a third click while the first pass segments a.tif
            write_clicks(proj, a.name, [point_feature(100.5, 100.5), point_feature(300, 200), point_feature(250, 60)])
        return prompts

    monkeypatch.setattr(pipeline, "read_prompts", read_then_export)
    passes = []
    script = Script({}, total=3)
    watch_project(proj, options=OPTS, models=Models(nuclei=guided_model()), interval=0.01, settle=0.01,
                  stop=script.done, on_run=passes.append, sleep=script)
    assert [[o.status for o in p.images] for p in passes] == [["segmented", "segmented"], ["segmented", "complete"]]
    assert passes[1].images[0].totals["clicks"] == 3


def test_cli_segment_watch_reruns_on_export_and_stops_on_ctrl_c(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 384, 256, 0.25)
    clicks = grid_clicks(384, 256, step=60)
    pts = write_clicks_csv(tmp_path / "clicks.csv", clicks)
    weights = make_weights(tmp_path / "w.pt")
    proc = subprocess.Popen([*NUCLICK, "segment", str(slide), "--points", str(pts), "-o", str(tmp_path / "out"),
                             "--weights", str(weights), "--device", "cpu", "--precision", "fp32", "--no-qc",
                             "--watch", "-q"], env=SUB_ENV, stderr=subprocess.PIPE, text=True)
    lines, queue = [], Queue()
    threading.Thread(target=lambda: [queue.put(line) for line in proc.stderr], daemon=True).start()
    try:
        def wait_for(text: str) -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    line = queue.get(timeout=1)
                except Empty:
                    continue
                lines.append(line)
                if text in line:
                    return
            raise AssertionError(f"no {text!r} in {lines}")

        wait_for("clicks segmented")
        before = file_signature(pts)
        write_clicks_csv(pts, clicks + [(200.5, 130.5, "A")])
        touch_later(pts)
        assert file_signature(pts) != before
        wait_for("incremental: ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        wait_for("stopped watching")
    finally:
        proc.kill()
    assert any(f"of {len(clicks) + 1} clicks segmented" in line and "incremental: " in line for line in lines)


def test_a_watched_run_is_not_interrupted_by_the_cycle_collector_which_runs_after_it():
    import gc
    import weakref

    from nuclick_wsi.workflows.watch import collect_after

    class Node:
        pass

    refs = []

    def run():
        assert not gc.isenabled()
        node = Node()
        node.me = node  # a cycle: only the collector frees it
        refs.append(weakref.ref(node))
        for _ in range(100_000):  # allocations that would trigger a collection
            [[]]
        assert refs[-1]() is not None
        if len(refs) > 1:
            raise RuntimeError("a failed run")

    assert gc.isenabled()
    stats = watch(lambda: 1, run, stop=lambda: True)
    assert stats.failed == 0 and gc.isenabled() and refs[0]() is None  # collected once the run was over
    said = []
    stats = watch(lambda: 1, run, stop=lambda: True, say=said.append)
    assert stats.failed == 1 and gc.isenabled()  # a failed run turns it back on too
    assert said == ["failed: unexpected RuntimeError: a failed run (still watching)"]
    gc.disable()  # a caller that keeps the collector off finds it off afterwards
    try:
        with collect_after():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
