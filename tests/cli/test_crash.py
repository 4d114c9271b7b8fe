"""Issue 12 case 3: ``nuclick-wsi segment`` killed mid-run (kill -9, SIGTERM), then rerun.

The rerun's folder holds exactly the outputs, byte-identical to a clean run (report.json compared
without its timings); SIGTERM itself cleans up and exits 143.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nuclick_wsi._util.fs import TMP_MARK
from tests.helpers import SUB_ENV, make_weights, write_tiff_slide

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

NUCLICK = [sys.executable, "-m", "nuclick_wsi.cli"]
ARGS = ["segment", "slide.tif", "-p", "clicks.csv", "-o", "out", "--format", "qupath,asap", "-q",
        "--weights", "w.pt", "--device", "cpu", "--precision", "fp32", "--batch-size", "4"]


def _workdir(root: Path, template: Path | None = None) -> Path:
    """slide.tif (1024^2), clicks.csv (200 clicks), w.pt under ``root``; copied from ``template``."""
    root.mkdir(parents=True)
    if template is not None:
        for name in ("slide.tif", "clicks.csv", "w.pt"):
            shutil.copy(template / name, root / name)
        return root
    write_tiff_slide(root / "slide.tif", 1024, 1024, 0.25)
    xy = np.random.default_rng(3).uniform(20, 1004, (200, 2))
    (root / "clicks.csv").write_text("x,y\n" + "".join(f"{x:.1f},{y:.1f}\n" for x, y in xy))
    make_weights(root / "w.pt")
    return root


def _folder(out: Path) -> dict[str, object]:
    """Every file under ``out`` by relative path: bytes, or the report without its timings (the QC page: present;
    the rerun state and the report's rerun section without the slide file's fingerprint: another copy)."""
    got: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_dir():
            got[rel] = "<dir>"
        elif rel.endswith(".report.json"):
            rep = json.loads(p.read_text())
            rep.pop("timings_s")
            rep["rerun"].pop("state_sha256")
            got[rel] = rep
        elif rel.endswith("nuclick-rerun/state.json"):
            state = json.loads(p.read_text())
            state["fingerprint"].pop("slide")
            got[rel] = state
        elif rel.endswith(".qc.html"):  # a page for people: it shows the run's timings
            got[rel] = "<qc page>"
        else:
            got[rel] = p.read_bytes()
    return got


def _start_and_signal(cwd: Path, sig: int) -> subprocess.Popen:
    """Start segment in ``cwd``; send ``sig`` once its label store is being written (a temporary)."""
    proc = subprocess.Popen(NUCLICK + ARGS, cwd=cwd, env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise AssertionError(f"segment ended before it could be killed: {proc.communicate()}")
        names = os.listdir(cwd / "out") if (cwd / "out").is_dir() else []
        if any(n.startswith(TMP_MARK) and "labels.zarr" in n for n in names):
            time.sleep(0.2)  # into the run
            os.kill(proc.pid, sig)
            proc.stderr_text = proc.communicate(timeout=120)[1]
            return proc
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("segment did not start writing within 120 s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = _workdir(tmp_path_factory.mktemp("crash") / "ref")
    res = subprocess.run(NUCLICK + ARGS, cwd=root, env=SUB_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
def test_killed_segment_then_rerun_equals_a_clean_run(reference, tmp_path, sig):
    work = _workdir(tmp_path / "w", template=reference)
    proc = _start_and_signal(work, sig)
    left = os.listdir(work / "out")
    if sig == signal.SIGKILL:
        assert any(n.startswith(TMP_MARK) for n in left)  # the kill left a temporary for the rerun
    else:  # handled like Ctrl-C: clean-up, then 128 + signum
        assert proc.returncode == 128 + sig, proc.stderr_text
        assert "nothing half-written" in proc.stderr_text
        assert left == [], left
    res = subprocess.run(NUCLICK + ARGS, cwd=work, env=SUB_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert _folder(work / "out") == _folder(reference / "out")


def test_sighup_and_sigterm_are_handled_like_ctrl_c():
    """In-process: inside the CLI's handler both signals raise a KeyboardInterrupt carrying the signal."""
    from nuclick_wsi.outputs.signals import Terminated, exit_status, signals_as_interrupt

    for sig in (signal.SIGHUP, signal.SIGTERM):
        with pytest.raises(KeyboardInterrupt) as err, signals_as_interrupt():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this
        assert isinstance(err.value, Terminated) and exit_status(err.value) == 128 + sig
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards
