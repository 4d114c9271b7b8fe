"""Watching: rerun ``segment`` (or a QuPath project run) whenever the clicks change, in one process.

The QuPath loop is click, export, run, import, look, click again. A rerun into the same folder is
incremental (:mod:`nuclick_wsi.engine.rerun`), but a new process pays for starting Python, importing
torch and loading and compiling the model every time, which is most of a small rerun. A watching
process pays that once: it runs, then polls the clicks file(s) and reruns when they change, with
the models and predictors it already holds::

    nuclick-wsi segment slide.svs --points clicks.geojson -o out/ --watch
    nuclick-wsi qupath run project/ --watch

A change is acted on once the file has stopped changing for ``settle`` seconds (an export still
being written is not read). A rerun that fails (a half-edited file, a bad click) prints its one-line
error and the watch goes on; its outputs are untouched, as after any failed run. Ctrl-C ends it.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nuclick_wsi._util.text import first_line
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.annotations.qupath_writer import FeatureMemory
from nuclick_wsi.outputs.signals import Terminated
from nuclick_wsi.model.models import Models
from nuclick_wsi.pipeline import SegmentOptions, SegmentResult, segment
from nuclick_wsi.workflows.qupath_project import ProjectRun, QuPathProject, read_project, run_project

__all__ = ["file_signature", "folder_signature", "watch", "watch_project", "watch_segment"]


def file_signature(path: str | os.PathLike) -> tuple[int, ...] | None:
    """(modification and change times in ns, size, inode) of a file; None when it does not exist.

    The change time and inode catch a rewrite of the same size within a coarse file-system clock
    (a moved click in a CSV) and a file replaced by another.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


def folder_signature(folder: str | os.PathLike, *files: str | os.PathLike) -> tuple:
    """Signatures of every file directly in ``folder`` (by name), and of ``files``."""
    found: list[tuple[str, Any]] = []
    try:
        with os.scandir(folder) as it:
            found = sorted((e.name, file_signature(e.path)) for e in it if e.is_file())
    except OSError:
        pass
    return tuple(found) + tuple(file_signature(f) for f in files)


@dataclass
class WatchStats:
    """What a watch did: runs started, and of those, runs that failed."""

    runs: int = 0
    failed: int = 0


@contextmanager
def collect_after():
    """Python's cycle collector off while the block runs, one collection after it.

    During a rerun the collector would walk the loaded model and everything earlier runs left
    (about 0.1 s of a 2 s rerun); a watch collects once the run is over, while it waits.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def watch(signature: Callable[[], Hashable], run: Callable[[], None], *, interval: float = 0.5,
          settle: float = 0.3, stop: Callable[[], bool] | None = None,
          say: Callable[[str], None] = lambda line: None,
          sleep: Callable[[float], None] = time.sleep) -> WatchStats:
    """Call ``run`` now, then again each time ``signature()`` changes and has stayed the same for
    ``settle`` seconds; poll every ``interval`` seconds until ``stop()`` is true.

    A run that raises is said in one line and the watch goes on (the next change tries again): a
    :class:`NuclickError` as its message, anything else (a file held by another program, a bug) as
    "unexpected" with its type. Ctrl-C ends the watch and returns; SIGTERM and SIGHUP
    (:class:`~nuclick_wsi.outputs.signals.Terminated`) end it and are raised again, for the exit status.
    """
    stats = WatchStats()

    def attempt() -> None:
        stats.runs += 1
        try:
            with collect_after():
                run()
        except NuclickError as exc:
            stats.failed += 1
            say(f"failed: {first_line(exc)} (still watching)")
        except Exception as exc:  # noqa: BLE001 - one failed run must not end a watch
            stats.failed += 1
            say(f"failed: unexpected {first_line(exc, typed=True)} (still watching)")

    try:
        last = signature()
        attempt()
        while not (stop and stop()):
            sleep(interval)
            now = signature()
            if now == last:
                continue
            while not (stop and stop()):  # wait until the file(s) stop changing
                sleep(settle)
                again = signature()
                if again == now:
                    break
                now = again
            else:
                break
            last = now
            attempt()
    except Terminated:
        say("stopped watching (terminated)")
        raise
    except KeyboardInterrupt:
        say("stopped watching")
    return stats


def describe(result: SegmentResult, seconds: float) -> str:
    """One line for a finished run: clicks segmented, and what the rerun reused."""
    t, rerun = result.report["totals"], result.report.get("rerun")
    line = f"{t['segmented']} of {t['clicks']} clicks segmented in {seconds:.1f} s"
    if rerun:
        line += (f" (incremental: {rerun['reused']} reused, {rerun['recomputed']} recomputed, "
                 f"{rerun['taken']} outlines kept without stitching)"
                 if rerun["mode"] == "incremental" else f" (full run: {rerun['why_full']})")
    return line


def watch_segment(slide_path: str | os.PathLike, points_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  options: SegmentOptions | None = None, models: Models | None = None, stem: str | None = None,
                  interval: float = 0.5, settle: float = 0.3, stop: Callable[[], bool] | None = None,
                  say: Callable[[str], None] = lambda line: None,
                  on_result: Callable[[SegmentResult], None] | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> WatchStats:
    """:func:`~nuclick_wsi.pipeline.segment` now and after every change of ``points_path``.

    The first run uses the folder's earlier run like any ``segment`` (incremental when it can); only
    the first honours ``options.full``, the reruns build on the run before them. ``on_result``
    receives each successful run's result; ``say`` one line per run.
    """
    models = models or Models()
    opts = options or SegmentOptions()
    done_once = [False]  # --full holds until a run succeeds
    memory = FeatureMemory()  # the GeoJSON text of unchanged outlines, not formatted again

    def run() -> None:
        t = time.perf_counter()
        result = segment(slide_path, points_path, out_dir, options=_without_full(opts) if done_once[0] else opts,
                         models=models, stem=stem, memory=memory)
        done_once[0] = True
        say(f"{time.strftime('%H:%M:%S')} {Path(points_path).name}: {describe(result, time.perf_counter() - t)}")
        if on_result is not None:
            on_result(result)

    say(f"watching {points_path} (Ctrl-C to stop)")
    return watch(lambda: file_signature(points_path), run, interval=interval, settle=settle, stop=stop, say=say,
                 sleep=sleep)


def watch_project(project: QuPathProject | str | os.PathLike, *, options: SegmentOptions | None = None, models: Models | None = None,
                  bounds_offset: bool | None = None, force: bool = False, interval: float = 0.5,
                  settle: float = 0.3, stop: Callable[[], bool] | None = None,
                  say: Callable[[str], None] = lambda line: None,
                  on_run: Callable[[ProjectRun], None] | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> WatchStats:
    """:func:`~nuclick_wsi.workflows.qupath_project.run_project` now and whenever a file of
    ``PROJECT/nuclick/clicks/`` or the project file changes (an export, a new image).

    Each pass reads the project again and segments the images whose clicks are newer than their
    results (incrementally); ``force`` and ``options.full`` hold for the first pass only.
    """
    models = models or Models()
    opts = options or SegmentOptions()
    # a project that cannot be read is an error now, not every second
    first_proj = project if isinstance(project, QuPathProject) else read_project(project)
    clicks_dir, project_file = first_proj.clicks_dir, first_proj.file
    passed = [False]  # --force and --full hold until a pass has no failed image
    memory = FeatureMemory()  # per image: the GeoJSON text of unchanged outlines
    seen: dict[str, Any] = {}  # clicks file -> its signature when the last pass started

    def run() -> None:
        proj = read_project(project_file)  # each pass: images added in QuPath since
        o, f = (_without_full(opts), False) if passed[0] else (opts, force)
        now = dict(folder_signature(proj.clicks_dir))
        # exported again since the last pass began (maybe while it ran, after it read the file):
        # redone whatever the results' times say
        redo = {str(proj.clicks_dir / e) for e, sig in now.items() if e in seen and seen[e] != sig}
        done = run_project(proj, options=o, models=models, bounds_offset=bounds_offset, force=f, redo=redo, log=None,
                           memory=memory)
        seen.clear()
        seen.update(now)
        passed[0] = passed[0] or not done.failed
        for image in done.images:
            if image.status in ("segmented", "failed"):
                say(f"{time.strftime('%H:%M:%S')} {image.name}: {image.status}: {image.message} "
                    f"({image.seconds:.1f} s)")
        if on_run is not None:
            on_run(done)

    say(f"watching {clicks_dir} (Ctrl-C to stop)")
    return watch(lambda: folder_signature(clicks_dir, project_file), run, interval=interval, settle=settle,
                 stop=stop, say=say, sleep=sleep)


def _without_full(opts: SegmentOptions) -> SegmentOptions:
    return replace(opts, full=False) if opts.full else opts
