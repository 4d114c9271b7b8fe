"""Cohorts: manifest checks, batch runs that skip, resume, isolate failures, lock, and survive kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.helpers import (NUCLICK, SUB_ENV, batch_cli, deterministic_files, disk_model, leftovers, make_cohort,
                           write_tiff_slide)
from nuclick_wsi._util.fs import TMP_MARK
from nuclick_wsi.cli.main import main
from nuclick_wsi.workflows.cohort import (
    BatchOptions,
    FileLock,
    ManifestError,
    manifest_from_qupath,
    read_manifest,
    run_batch,
    select_rows,
    summary_only,
    write_manifest,
)
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.pipeline import Models, SegmentOptions, segment

def quick(**kw) -> BatchOptions:
    kw.setdefault("segment", SegmentOptions(progress=False))
    return BatchOptions(**kw)


# --------------------------------------------------------------------------------------------------
# manifest


def test_manifest_reports_every_bad_row(tmp_path):
    make_cohort(tmp_path, n=2, weights=False)
    (tmp_path / "other").mkdir()
    write_tiff_slide(tmp_path / "other" / "s0.tif", 64, 64, 0.25)
    (tmp_path / "bad.csv").write_text(
        "slide,points,mpp,weights,stem\n"
        "slides/s0.tif,clicks/s0.csv,,,\n"          # 2 fine
        "slides/nope.tif,clicks/s0.csv,,,\n"        # 3 slide missing
        "slides/s1.tif,clicks/nope.csv,abc,,\n"     # 4 points missing, mpp not a number
        "slides/s1.tif,clicks/s1.csv,40,,\n"        # 5 magnification given as um/px
        "slides/s1.tif,clicks/s1.csv,-0.5,,x1\n"    # 6 negative um/px
        "other/s0.tif,clicks/s0.csv,,,\n"           # 7 stem s0 again (line 2)
        "slides/s1.tif,clicks/s1.csv,,,S0\n"        # 8 stem S0: same as s0 on a case-insensitive disk
        "slides/s1.tif,clicks/s1.csv,,nope.pt,y\n"  # 9 weights missing
        "slides/s1.tif,clicks/s1.csv,,,a/b\n"       # 10 stem is a path
        "slides/s1.tif,clicks/s1.csv,0.5,,ok\n"     # 11 fine
    )
    text = (tmp_path / "bad.csv").read_text().replace("mpp,weights,stem\n", "mpp,weights,stem,bounds_offset\n")
    (tmp_path / "bad.csv").write_text(text + "slides/s1.tif,clicks/s1.csv,,,z,maybe\n")  # 12 not a boolean
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "bad.csv")
    err = info.value
    lines = sorted({int(p.split()[1]) for p in err.problems})
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 12]
    text = str(err)
    for needle in ("slide not found", "points file not found", "'abc' is not a number", "looks like a magnification",
                   "-0.5", "also used on line 2", "weights file not found", "plain file name",
                   "'maybe' is not true or false"):
        assert needle in text, needle
    assert text.splitlines()[0].endswith("nothing was run")
    # nothing starts: the output folder is not even created; the CLI prints every problem
    out = tmp_path / "out"
    with pytest.raises(ManifestError):
        run_batch(tmp_path / "bad.csv", out, quick(), models=Models(nuclei=disk_model()))
    assert not out.exists()
    res = CliRunner().invoke(main, ["batch", str(tmp_path / "bad.csv"), "-o", str(out)])
    assert res.exit_code == 1
    for line in (3, 4, 5, 6, 7, 8, 9, 10, 12):
        assert f"line {line} " in res.output
    assert not out.exists()


def test_manifest_columns_paths_and_header_errors(tmp_path, monkeypatch):
    make_cohort(tmp_path, n=2, weights=True)
    (tmp_path / "m.csv").write_text(
        "\ufeffSlide, Points ,MPP,stem,patient\n"
        "# a comment line\n"
        "slides/s0.tif,clicks/s0.csv,0.5,first,P1\n"
        "\n"
        ",,,,\n"
        f"{tmp_path / 'slides' / 's1.tif'},clicks/s1.csv,,,P2\n")
    monkeypatch.chdir("/")
    man = read_manifest(tmp_path / "m.csv")
    assert [r.stem for r in man.rows] == ["first", "s1"]
    assert [r.index for r in man.rows] == [0, 1]
    assert [r.line for r in man.rows] == [3, 6]
    assert man.rows[0].slide == tmp_path.resolve() / "slides" / "s0.tif"
    assert man.rows[0].mpp == 0.5 and man.rows[1].mpp is None and man.rows[1].weights is None
    assert man.ignored_columns == ["patient"]
    (tmp_path / "h.csv").write_text("image,clicks\na.tif,a.csv\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text("slide,points\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path / "e.csv")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


def test_select_rows(tmp_path):
    man = read_manifest(make_cohort(tmp_path, n=3, weights=False))
    assert [r.stem for r in select_rows(man)] == ["s0", "s1", "s2"]
    assert [r.stem for r in select_rows(man, only=["s2", "s0"])] == ["s0", "s2"]
    assert [r.stem for r in select_rows(man, task_index=1)] == ["s1"]
    assert [r.stem for r in select_rows(man, task_index=1, rows_per_task=2)] == ["s2"]
    with pytest.raises(NuclickError, match=r"tasks 0\.\.2"):
        select_rows(man, task_index=3)
    with pytest.raises(NuclickError, match="no row with stem"):
        select_rows(man, only=["s9"])


def test_manifest_from_qupath(tmp_path):
    make_cohort(tmp_path, n=2, weights=False)
    proj = tmp_path / "proj"
    clicks = proj / "nuclick" / "clicks"
    clicks.mkdir(parents=True)
    for name in ("s0.tif", "a_b.tif", "remote"):
        (clicks / f"{name}.geojson").write_text(
            '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"objectType": "annotation"},'
            ' "geometry": {"type": "Point", "coordinates": [20, 30]}}]}')

    def entry(k, name, uri):
        return {"serverBuilder": {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.openslide."
                                  "OpenslideServerBuilder", "uri": uri, "args": []}, "entryID": k, "imageName": name}

    slides = tmp_path / "slides"
    images = [entry(1, "s0.tif", (slides / "s0.tif").as_uri()),
              entry(2, "s1.tif", (slides / "s1.tif").as_uri()),                    # no clicks exported
              entry(3, "a/b.tif", "file:/C:/Users/me/slides/s1.tif"),               # a Windows path
              {"serverBuilder": {"builderType": "rotated", "rotation": "ROTATE_180",
                                 "builder": {"builderType": "uri", "uri": "https://omero/x"}},
               "entryID": 4, "imageName": "remote"}]
    (proj / "project.qpproj").write_text(json.dumps({"version": "0.5.1", "images": images}))
    rows, notes = manifest_from_qupath(proj, slide_dir=slides)
    assert [(r["stem"], Path(r["slide"]).name, r["bounds_offset"]) for r in rows] == [
        ("s0.tif", "s0.tif", True), ("a_b.tif", "s1.tif", True)]
    assert any(n.startswith("s1.tif: no clicks") for n in notes) and any(n.startswith("remote:") for n in notes)
    res = CliRunner().invoke(main, ["manifest", "--from-qupath", str(proj / "project.qpproj"), "-o",
                                    str(proj / "manifest.csv"), "--slide-dir", str(slides)])
    assert res.exit_code == 0, res.output
    man = read_manifest(proj / "manifest.csv")
    assert [(r.stem, r.bounds_offset) for r in man.rows] == [("s0.tif", True), ("a_b.tif", True)]
    text = (proj / "manifest.csv").read_text()
    assert text.splitlines()[0] == "slide,points,stem,bounds_offset"
    assert text.splitlines()[1].startswith(str(slides.resolve() / "s0.tif"))
    assert ",nuclick/clicks/s0.tif.geojson," in text  # relative: inside the manifest's folder
    # the rows run: clicks on the project's images segment into <file name>.geojson
    res = run_batch(proj / "manifest.csv", proj / "nuclick" / "results", quick(), models=Models(nuclei=disk_model()))
    assert res.ok and (proj / "nuclick" / "results" / "a_b.tif.geojson").exists()


def test_manifest_never_overwrites_the_project_or_its_inputs(tmp_path):
    """``-o`` mistyped (tab completion) onto the project file, a slide or a clicks file: refused in one
    line naming both, the file intact (was: the QuPath project replaced by the CSV)."""
    make_cohort(tmp_path, n=1, weights=False)
    slide = tmp_path / "slides" / "s0.tif"
    proj = tmp_path / "proj"
    clicks = proj / "nuclick" / "clicks" / "s0.tif.geojson"
    clicks.parent.mkdir(parents=True)
    clicks.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
                      '"geometry": {"type": "Point", "coordinates": [20, 30]}}]}')
    images = [{"serverBuilder": {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.openslide."
                                 "OpenslideServerBuilder", "uri": slide.as_uri(), "args": []},
               "entryID": 1, "imageName": "s0.tif"}]
    (proj / "project.qpproj").write_text(json.dumps({"version": "0.5.1", "images": images}))
    for target in (proj / "project.qpproj", slide, clicks):
        before = target.read_bytes()
        res = CliRunner().invoke(main, ["manifest", "--from-qupath", str(proj), "-o", str(target)])
        assert res.exit_code == 1 and "would overwrite the" in res.output and len(res.output.strip().splitlines()) == 1
        assert target.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# batch


def test_batch_redoes_a_row_whose_clicks_differ_from_what_its_run_read(tmp_path):
    """Clicks saved again while the row ran: older than the outputs, but not what they were made from."""
    manifest = make_cohort(tmp_path, n=1, weights=False)
    res = run_batch(manifest, tmp_path / "out", quick(), models=Models(nuclei=disk_model()))
    assert [r.status for r in res.results] == ["segmented"]
    points = tmp_path / "clicks" / "s0.csv"
    done = (tmp_path / "out" / "s0.report.json").stat().st_mtime
    points.write_text("\n".join(points.read_text().splitlines()[:2]) + "\n")  # one click left
    os.utime(points, (done - 10, done - 10))
    res = run_batch(manifest, tmp_path / "out", quick(), models=Models(nuclei=disk_model()))
    assert [(r.status, r.clicks) for r in res.results] == [("segmented", 1)]


def test_batch_outputs_equal_segment(tmp_path):
    manifest = make_cohort(tmp_path, n=2, weights=False)
    model = disk_model()
    res = run_batch(manifest, tmp_path / "out", quick(), models=Models(nuclei=model))
    assert res.ok and [r.status for r in res.results] == ["segmented", "segmented"]
    assert res.results[0].clicks == 5 and res.results[0].segmented == 5
    segment(tmp_path / "slides" / "s1.tif", tmp_path / "clicks" / "s1.csv", tmp_path / "single",
            options=SegmentOptions(progress=False), models=Models(nuclei=model))
    a = {k: v for k, v in deterministic_files(tmp_path / "out").items() if k.startswith("s1.")}
    assert a == deterministic_files(tmp_path / "single") and a
    assert leftovers(tmp_path / "out") == []
    summary = (tmp_path / "out" / "batch-summary.csv").read_text().splitlines()
    assert summary[0] == "stem,status,clicks,segmented,skipped,seconds,slide,points,error"
    assert summary[1].startswith("s0,segmented,5,5,0,")


def test_skip_complete_and_resume(tmp_path):
    manifest = make_cohort(tmp_path, n=3, weights=False)
    out = tmp_path / "out"
    model = disk_model()
    run_batch(manifest, out, quick(), models=Models(nuclei=model))
    before = deterministic_files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # s1 lost an output; s2 has a stray temporary and a stale lock from a killed process
    (out / "s1.geojson").unlink()
    (out / f"{TMP_MARK}0123abcd-s2.geojson").write_text("partial")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "s2.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": None,
                                             "time": time.time(), "token": "x"}))
    res = run_batch(manifest, out, quick(), models=Models(nuclei=model))
    assert [r.status for r in res.results] == ["complete", "segmented", "complete"]
    assert deterministic_files(out) == before
    assert leftovers(out) == []
    for name in ("s0.geojson", "s0.report.json", "s2.report.json"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]  # untouched
    # clicks exported again after the outputs were written: that slide is redone
    later = time.time() + 5
    os.utime(tmp_path / "clicks" / "s0.csv", (later, later))
    res = run_batch(manifest, out, quick(), models=Models(nuclei=model))
    assert [r.status for r in res.results] == ["segmented", "complete", "complete"]
    # a different set of formats is not complete: the slides are redone with it
    res = run_batch(manifest, out, quick(segment=SegmentOptions(progress=False, formats=("qupath", "asap"))), models=Models(nuclei=model))
    assert [r.status for r in res.results] == ["segmented"] * 3 and (out / "s0.xml").exists()


def test_failure_is_isolated_recorded_and_retried(tmp_path):
    manifest = make_cohort(tmp_path, n=3, weights=True)
    good = (tmp_path / "clicks" / "s1.csv").read_text()
    (tmp_path / "clicks" / "s1.csv").write_text("this is, not\na click file\n")
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["batch", str(manifest), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "s1: FAILED" in res.output
    assert (out / "s0.report.json").exists() and (out / "s2.report.json").exists()
    assert not (out / "s1.report.json").exists() and not (out / "s1.geojson").exists()
    record = json.loads((out / "s1.failed.json").read_text())
    assert "s1.csv" in record["error"]
    rows = (out / "batch-summary.csv").read_text().splitlines()
    assert rows[2].startswith("s1,failed,") and "s1.csv" in rows[2]
    assert leftovers(out) == []
    # fixed: the rerun does only s1 and clears its failure record
    (tmp_path / "clicks" / "s1.csv").write_text(good)
    res = runner.invoke(main, ["batch", str(manifest), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "s0: outputs complete, skipped" in res.output and "s1: 5 of 5 clicks segmented" in res.output
    assert not (out / "s1.failed.json").exists()
    res = runner.invoke(main, ["batch", str(manifest), "-o", str(out), "--summary-only"])
    assert res.exit_code == 0 and "3 complete" in res.output


def test_unexpected_exception_is_recorded(tmp_path, monkeypatch):
    manifest = make_cohort(tmp_path, n=2, weights=False)
    import nuclick_wsi.workflows.cohort.batch as cohort

    real = cohort.segment

    def flaky(slide, *a, **kw):
        if Path(slide).name == "s0.tif":
            raise MemoryError("out of memory")
        return real(slide, *a, **kw)

    monkeypatch.setattr(cohort, "segment", flaky)
    res = run_batch(manifest, tmp_path / "out", quick(), models=Models(nuclei=disk_model()))
    assert [r.status for r in res.results] == ["failed", "segmented"] and not res.ok
    record = json.loads((tmp_path / "out" / "s0.failed.json").read_text())
    assert record["error"] == "MemoryError: out of memory" and "Traceback" in record["traceback"]


# --------------------------------------------------------------------------------------------------
# locks


def _lock_json(host: str, pid: int, token: str = "t") -> str:
    return json.dumps({"host": host, "pid": pid, "start": None, "time": time.time(), "token": token})


def test_lock_is_exclusive_and_released(tmp_path):
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.acquire()
    assert not b.acquire()  # same process, other holder object: still exclusive
    assert b.holder is not None and b.holder.pid == os.getpid()
    a.release()
    assert not (tmp_path / "x.lock").exists()
    assert b.acquire()
    a.release()  # not a's any more: nothing happens
    assert (tmp_path / "x.lock").exists()
    b.release()
    assert os.listdir(tmp_path) == []


def test_stale_locks(tmp_path):
    host = os.uname().nodename
    path = tmp_path / "x.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = [(_lock_json(host, dead.pid), 0, True),            # our host, process gone
                 (_lock_json(host, live.pid), 0, False),           # our host, process alive
                 (_lock_json(host, live.pid), 700, True),          # alive but no heartbeat for too long
                 (_lock_json("node-17", 12345), 0, False),         # another node, fresh heartbeat
                 (_lock_json("node-17", 12345), 700, True),        # another node, no heartbeat
                 ("garbage", 0, False),                            # being written
                 ("garbage", 60, True)]                            # left half-written
        for content, age, stale in cases:
            path.write_text(content)
            t = time.time() - age
            os.utime(path, (t, t))
            lock = FileLock(path, stale_after=600)
            assert lock.acquire() is stale, (content, age)
            lock.release()
            path.unlink(missing_ok=True)
        assert [p for p in os.listdir(tmp_path)] == []
        # a waiting acquire gets the lock once the holder dies
        path.write_text(_lock_json(host, live.pid))
        lock = FileLock(path)
        assert not lock.acquire(timeout=0.3, poll=0.1)
        live.kill()
        live.wait()
        assert lock.acquire(timeout=5, poll=0.1)
        lock.release()
    finally:
        live.kill()


def test_heartbeat_keeps_a_lock_fresh(tmp_path):
    lock = FileLock(tmp_path / "x.lock", stale_after=2, heartbeat=0.2)
    assert lock.acquire()
    t0 = (tmp_path / "x.lock").stat().st_mtime
    time.sleep(0.7)
    assert (tmp_path / "x.lock").stat().st_mtime > t0
    lock.release()


def test_batch_leaves_locked_slides_to_their_holder(tmp_path):
    manifest = make_cohort(tmp_path, n=2, weights=False)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "s0.lock").write_text(_lock_json(os.uname().nodename, holder.pid))
        res = run_batch(manifest, out, quick(), models=Models(nuclei=disk_model()))
        assert [r.status for r in res.results] == ["running", "segmented"] and res.ok
        assert not (out / "s0.report.json").exists()
        assert "s0,running," in (out / "batch-summary.csv").read_text()
        # --wait: picks it up when the holder is gone
        holder.kill()
        holder.wait()
        res = run_batch(manifest, out, quick(wait=True, poll=0.1), models=Models(nuclei=disk_model()))
        assert [r.status for r in res.results] == ["segmented", "complete"]
        assert leftovers(out) == []
    finally:
        holder.kill()


# --------------------------------------------------------------------------------------------------
# several processes, kill -9


def _slow_cohort(root: Path) -> Path:
    return make_cohort(root, n=4, clicks=12, size=(512, 384))


def test_two_processes_share_a_manifest(tmp_path):
    manifest = _slow_cohort(tmp_path)
    ref = batch_cli(manifest, tmp_path / "ref", "--batch-size", "4")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    procs = [subprocess.Popen([*NUCLICK, "batch", str(manifest), "-o", str(out), "--batch-size", "4", "--wait"],
                              env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    done = [line.split(":")[0].split()[-1] for _, err in logs for line in err.splitlines() if "clicks segmented in" in line]
    assert sorted(done) == ["s0", "s1", "s2", "s3"]  # each slide segmented once, by one of the two
    assert deterministic_files(out) == deterministic_files(tmp_path / "ref")
    assert leftovers(out) == []


def _kill_when(proc: subprocess.Popen, out: Path, ready, timeout: float = 120.0) -> bool:
    """kill -9 ``proc`` as soon as ``ready(names in out)``; False if it ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            names = []
        if ready(names):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("timed out waiting for the batch to start")


def test_kill_9_then_rerun_gives_identical_bytes(tmp_path):
    manifest = _slow_cohort(tmp_path)
    ref = batch_cli(manifest, tmp_path / "ref", "--batch-size", "4")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    cmd = [*NUCLICK, "batch", str(manifest), "-o", str(out), "--batch-size", "4", "-q"]
    # 1: killed in the middle of the first slide (its temporaries and lock are left behind)
    p = subprocess.Popen(cmd, env=SUB_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(p, out, lambda names: any(n.startswith(TMP_MARK) and "labels.zarr" in n for n in names)), \
        "the first run ended before it could be killed"
    assert leftovers(out)  # the kill left something to clean up
    # 2: killed once the rerun has finished a slide and started another
    p = subprocess.Popen(cmd, env=SUB_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(p, out, lambda names: sum(n.endswith(".report.json") for n in names) >= 1
                      and any(n.startswith(TMP_MARK) and "labels.zarr" in n for n in names)), \
        "the rerun ended before it could be killed"
    # 3: the rerun completes; same bytes as the uninterrupted run, nothing left over
    res = subprocess.run(cmd, env=SUB_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert deterministic_files(out) == deterministic_files(tmp_path / "ref")
    assert leftovers(out) == []
    assert not list(out.glob("*.failed.json"))
    statuses = [line.split(",")[1] for line in (out / "batch-summary.csv").read_text().splitlines()[1:]]
    assert set(statuses) <= {"segmented", "complete"} and len(statuses) == 4


def test_task_index_runs_one_row(tmp_path):
    manifest = make_cohort(tmp_path, n=3, weights=False)
    res = run_batch(manifest, tmp_path / "out", quick(task_index=2), models=Models(nuclei=disk_model()))
    assert [r.status for r in res.results] == ["pending", "pending", "segmented"]
    assert res.selected == ["s2"]
    state = summary_only(manifest, tmp_path / "out", quick(), write=False, models=Models(nuclei=disk_model()))
    assert [r.status for r in state.results] == ["pending", "pending", "complete"]
    res = CliRunner().invoke(main, ["batch", str(manifest), "-o", str(tmp_path / "out"), "--dry-run"])
    # the CLI's embedded model is not the one s2 was made with: s2 would be redone too
    assert res.exit_code == 0 and "3 of the 3 selected would be segmented" in res.output
    assert "weights changed" in res.output
    write_manifest(tmp_path / "copy.csv", [{"slide": r.slide, "points": r.points, "stem": r.stem}
                                           for r in read_manifest(manifest).rows])
    assert [r.stem for r in read_manifest(tmp_path / "copy.csv").rows] == ["s0", "s1", "s2"]


def test_slides_in_flight_give_the_same_bytes(tmp_path):
    manifest = make_cohort(tmp_path, n=3, weights=False)
    model = disk_model()
    one = run_batch(manifest, tmp_path / "one", quick(slides_in_flight=1), models=Models(nuclei=model))
    two = run_batch(manifest, tmp_path / "two", quick(slides_in_flight=2), models=Models(nuclei=model))
    assert [r.status for r in two.results] == ["segmented"] * 3 and one.ok
    assert deterministic_files(tmp_path / "two") == deterministic_files(tmp_path / "one")
    assert leftovers(tmp_path / "two") == []


def test_batch_reruns_incrementally_and_full_passes_through(tmp_path):
    manifest = make_cohort(tmp_path, n=1)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "-o", str(out), "--device", "cpu", "-q", "--no-qc"]
    assert CliRunner().invoke(main, args).exit_code == 0
    later = time.time() + 5
    clicks = tmp_path / "clicks" / "s0.csv"
    clicks.write_text(clicks.read_text() + "200.5,150.5\n")  # one click added
    os.utime(clicks, (later, later))
    assert CliRunner().invoke(main, args).exit_code == 0
    rerun = json.loads((out / "s0.report.json").read_text())["rerun"]
    assert rerun["mode"] == "incremental" and rerun["ids"]["new"] == 1 and rerun["reused"] > 0
    os.utime(clicks, (later + 5, later + 5))
    assert CliRunner().invoke(main, [*args, "--full"]).exit_code == 0
    assert json.loads((out / "s0.report.json").read_text())["rerun"]["why_full"] == "--full"


def test_summary_only_rewrites_a_stale_index(tmp_path):
    """Jobs that end together each write OUT/index.html from what they saw: the last written can show a
    finished slide as pending/running. --summary-only (Snakemake's final job, the array's afterwards
    command) rewrote batch-summary.csv but left that stale index.html as it was."""
    manifest = make_cohort(tmp_path / "c", n=2, clicks=3)
    out = tmp_path / "out"
    assert batch_cli(manifest, out, "--only", "s0").returncode == 0
    stale = (out / "index.html").read_text(encoding="utf-8")
    assert 'data-v="pending"' in stale
    assert batch_cli(manifest, out, "--only", "s1").returncode == 0
    (out / "index.html").write_text(stale, encoding="utf-8")  # s0's job wrote last
    res = batch_cli(manifest, out, "--summary-only")
    assert res.returncode == 0, res.stderr
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'data-v="pending"' not in index and 'href="s1.qc.html"' in index


def _again(manifest: Path, out: Path, models: Models | None = None, **seg) -> tuple[str, str]:
    """One more batch run of a one-row manifest: the row's status and the line the user saw."""
    lines: list[str] = []
    res = run_batch(manifest, out, quick(segment=SegmentOptions(progress=False, **seg)),
                    models=models or Models(nuclei=disk_model()), log=lines.append)
    return res.results[0].status, lines[0]


def test_batch_redoes_a_row_asked_for_something_else_and_says_why(tmp_path):
    """A slide counts as done only when its earlier run was asked for the same thing (was: complete
    outputs skipped whatever the threshold, weights, object type, formats, um/px, frame or --qc)."""
    manifest = make_cohort(tmp_path, n=1, clicks=3, size=(160, 128), weights=False)
    out = tmp_path / "out"
    assert _again(manifest, out)[0] == "segmented"
    # what does not change the results' meaning: skipped
    assert _again(manifest, out, device="cpu", precision="fp32", batch_size=2, runtime="torch") == \
        ("complete", "[1/1] s0: outputs complete, skipped")
    retrained = disk_model()
    retrained.net.dummy.data += 1.0  # other weights, same everything else
    cases = [({"models": Models(nuclei=disk_model(), postprocess={"nuclei": {"threshold": 0.4}})}, "threshold changed"),
             ({"models": Models(nuclei=disk_model(min_object_px=5, min_hole_px=3))}, "min_hole_px, min_object_px changed"),
             ({"models": Models(nuclei=retrained)}, "model weights changed"),
             ({"object_type": "annotation"}, "object type changed"),
             ({"reader": "tifffile"}, "slide reader changed"),
             ({"mpp": 0.3}, "slide um/px (--mpp or the manifest's) changed"),
             ({"bounds_offset": False}, "bounds offset changed"),
             ({"tta": True}, "test-time augmentation changed"),
             ({"formats": ("qupath", "asap")}, "formats changed"),  # outputs missing: redone, and said why
             ({"gzip": True}, "gzip changed")]
    for kw, why in cases:
        for again in (kw, {}):  # the change, then back: each redoes the row and says why
            status, line = _again(manifest, out, **again)
            assert status == "segmented" and line.startswith(f"[1/1] s0: redone: {why}; 3 of 3 clicks segmented"), \
                (again, line)
            assert _again(manifest, out, **again)[0] == "complete", again  # asked again: done
    # the redo is an ordinary segment run: incremental where its own fingerprint allows
    assert _again(manifest, out, object_type="annotation")[0] == "segmented"
    assert json.loads((out / "s0.report.json").read_text())["rerun"]["mode"] == "incremental"
    # --qc after --no-qc redoes; --no-qc after --qc does not (the outlines asked for are there, the page is extra)
    assert _again(manifest, out, object_type="annotation", qc=True)[1].startswith("[1/1] s0: redone: QC page missing")
    assert _again(manifest, out, object_type="annotation", qc=True)[0] == "complete"
    assert _again(manifest, out, object_type="annotation")[0] == "complete" and (out / "s0.qc.html").exists()
    # --full redoes every time
    for _ in range(2):
        assert _again(manifest, out, full=True)[1].startswith("[1/1] s0: redone: --full; ")
    # the manifest's um/px and frame columns are asked for too
    (tmp_path / "m2.csv").write_text("slide,points,mpp,bounds_offset\nslides/s0.tif,clicks/s0.csv,0.3,false\n")
    status, line = _again(tmp_path / "m2.csv", out)
    assert status == "segmented" and "redone: bounds offset, slide um/px (--mpp or the manifest's) changed" in line
    assert _again(tmp_path / "m2.csv", out)[0] == "complete"
    # --dry-run counts a row it would redo, with the reason
    m2 = tmp_path / "m2.csv"
    state = summary_only(m2, out, quick(), write=False, models=Models(nuclei=disk_model(threshold=0.45)))
    assert [(r.status, r.error) for r in state.results] == [("pending", "would be redone: threshold changed")]
    assert [r.status for r in summary_only(m2, out, quick(), write=False).results] == ["complete"]  # --summary-only
    res = CliRunner().invoke(main, ["batch", str(m2), "-o", str(out), "--dry-run"])  # the embedded model
    assert res.exit_code == 0 and "1 of the 1 selected would be segmented" in res.output, res.output


def test_batch_keeps_the_old_rule_for_reports_without_asked(tmp_path):
    """A report of an older nuclick-wsi (no ``asked`` section): complete outputs are done, as then."""
    manifest = make_cohort(tmp_path, n=1, clicks=2, size=(128, 128), weights=False)
    out = tmp_path / "out"
    assert _again(manifest, out)[0] == "segmented"
    report = json.loads((out / "s0.report.json").read_text())
    del report["asked"]
    (out / "s0.report.json").write_text(json.dumps(report))
    assert _again(manifest, out, object_type="annotation", qc=True)[0] == "complete"
    status, line = _again(manifest, out, full=True)
    assert status == "segmented" and "redone: --full;" in line


def test_batch_redoes_a_row_whose_weights_file_was_retrained(tmp_path):
    """The manifest's weights column names a file trained again since (same path, other weights)."""
    from nuclick_wsi.model.architectures.unet import LightUNet
    from nuclick_wsi.model.weights import save_checkpoint

    manifest = make_cohort(tmp_path, n=1, clicks=2, size=(128, 128), weights=True)
    out = tmp_path / "out"
    assert _again(manifest, out, models=Models())[0] == "segmented"
    assert _again(manifest, out, models=Models())[0] == "complete"
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "w.pt", LightUNet((8, 16, 32, 64)), "light-unet", {"widths": [8, 16, 32, 64]},
                    {"mpp": 0.25, "patch_size": 128, "task": "nuclei", "postprocess": {"threshold": 0.3}})
    status, line = _again(manifest, out, models=Models())
    assert status == "segmented" and "redone: model weights changed" in line
