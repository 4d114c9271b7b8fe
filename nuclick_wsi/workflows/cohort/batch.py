"""Running a manifest: each row under its lock, slides in flight in threads, SIGTERM/SIGHUP as an interrupt."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nuclick_wsi.workflows.cohort.locks import FAILED_SUFFIX, FileLock, HOST, LOCK_SUFFIX, remove_temporaries, stem_file_names
from nuclick_wsi.workflows.cohort.manifest import SUMMARY_NAME, Manifest, ManifestRow, read_manifest, select_rows
from nuclick_wsi.workflows.cohort.summary import BatchResult, SlideResult, write_summary
from nuclick_wsi._util.fs import remove_path, atomic_output, ensure_writable_dir
from nuclick_wsi._util.text import first_line
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.models import Models
from nuclick_wsi.outputs.paths import output_paths, outputs_fresh
from nuclick_wsi.outputs.safety import refuse_input_among
from nuclick_wsi.outputs.signals import signals_as_interrupt
from nuclick_wsi.pipeline import SegmentOptions, segment
from nuclick_wsi.qc import index_row, qc_paths, refuse_foreign_index, write_index
from nuclick_wsi.workflows.redo import redo_reason


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class BatchOptions:
    """Options of :func:`run_batch` (the ``batch`` command's flags)."""

    segment: SegmentOptions = field(default_factory=lambda: SegmentOptions(progress=False))
    only: Sequence[str] = ()
    task_index: int | None = None
    rows_per_task: int = 1
    stale_after: float = 600.0
    wait: bool = False  #: wait for rows another process is working on, instead of leaving them to it
    poll: float = 2.0
    slides_in_flight: int | None = None  #: None: 2 on CUDA (keeps the GPU busy across slides), else 1
    summary: bool = True


def _totals(report: dict[str, Any] | None) -> tuple[int | None, int | None, float | None]:
    if not report:
        return None, None, None
    t = report.get("totals", {})
    return t.get("clicks"), t.get("segmented"), (report.get("timings_s") or {}).get("wall")


def row_complete(row: ManifestRow, paths: dict[str, Path], ngff: str | None = None) -> bool:
    """Outputs complete (label stores of NGFF ``ngff`` if given), and written after the slide and its
    clicks last changed (else: redo)."""
    return outputs_fresh(paths, [row.slide, row.points], ngff, clicks=row.points)


def row_options(row: ManifestRow, so: SegmentOptions) -> SegmentOptions:
    """The batch's segment options with the row's um/px and frame, where the manifest gives them."""
    return dataclasses.replace(so, mpp=row.mpp if row.mpp is not None else so.mpp,
                               bounds_offset=so.bounds_offset if row.bounds_offset is None else row.bounds_offset)


def row_models_of(row: ManifestRow, models: Models) -> Models:
    """The batch's models with the row's nucleus weights, where the manifest gives them."""
    return models.with_nuclei(str(row.weights) if row.weights is not None else None)


def disk_state(row: ManifestRow, out_dir: Path, opts: BatchOptions, models: Models | None = None) -> SlideResult:
    """A row's state from what is in ``out_dir`` (complete, failed, running or pending). With ``models``
    (``--dry-run``): complete outputs that this batch would redo (``--full``, or asked for something
    else) are pending, with the reason as their error."""
    so = opts.segment
    paths = output_paths(out_dir, row.stem, so.formats, so.gzip)
    if row_complete(row, paths, so.ngff):
        why = None if models is None else redo_reason(paths["report"], row_options(row, so), row_models_of(row, models),
                                                      qc_paths(out_dir, row.stem).values())
        if why is None:
            return SlideResult(row, "complete", *_totals(_read_json(paths["report"])))
        return SlideResult(row, "pending", error=f"would be redone: {why}")
    holder = FileLock(out_dir / f"{row.stem}{LOCK_SUFFIX}", opts.stale_after).state()
    if holder is not False:
        return SlideResult(row, "running", holder=holder.describe() if holder else "")
    failed = _read_json(out_dir / f"{row.stem}{FAILED_SUFFIX}")
    if failed is not None:
        return SlideResult(row, "failed", error=str(failed.get("error", "")))
    return SlideResult(row, "pending")


def process_row(row: ManifestRow, out_dir: Path, opts: BatchOptions, models: Models) -> SlideResult:
    """Segment one row unless its outputs are complete or another process holds it."""
    lock = FileLock(out_dir / f"{row.stem}{LOCK_SUFFIX}", opts.stale_after)
    if not lock.acquire():
        return SlideResult(row, "running", holder=lock.holder.describe() if lock.holder else "")
    failed_path = out_dir / f"{row.stem}{FAILED_SUFFIX}"
    try:
        remove_temporaries(out_dir, stem_file_names(row.stem))
        so = opts.segment
        paths = output_paths(out_dir, row.stem, so.formats, so.gzip)
        seg_opts, row_models = row_options(row, so), row_models_of(row, models)
        complete = row_complete(row, paths, so.ngff)
        redone = None  # also said when outputs are missing because the formats changed
        if complete or paths["report"].exists():
            redone = redo_reason(paths["report"], seg_opts, row_models, qc_paths(out_dir, row.stem).values())
        if complete and redone is None:
            remove_path(failed_path)
            return SlideResult(row, "complete", *_totals(_read_json(paths["report"])))
        t0 = time.perf_counter()
        try:
            res = segment(row.slide, row.points, out_dir, options=seg_opts, models=row_models, stem=row.stem)
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the others
            record = {"stem": row.stem, "slide": str(row.slide), "points": str(row.points), "error": first_line(exc, typed=not isinstance(exc, NuclickError)),
                      "type": type(exc).__name__, "host": HOST, "pid": os.getpid(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if not isinstance(exc, NuclickError):
                record["traceback"] = traceback.format_exc()
            with contextlib.suppress(OSError), atomic_output(failed_path) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            return SlideResult(row, "failed", seconds=time.perf_counter() - t0, error=record["error"])
        remove_path(failed_path)
        clicks, segmented, _ = _totals(res.report)
        return SlideResult(row, "segmented", clicks, segmented, time.perf_counter() - t0, redone=redone or "")
    finally:
        lock.release()


def _in_flight(opts: BatchOptions) -> int:
    if opts.slides_in_flight is not None:
        return max(1, int(opts.slides_in_flight))
    from nuclick_wsi.model.predictor import resolve_device

    try:
        return 2 if resolve_device(opts.segment.device).type == "cuda" else 1
    except NuclickError:
        return 1


def refuse_manifest_overwrite(man: Manifest, out_dir: str | os.PathLike) -> None:
    """Raise OutputError when the summary or a row's outputs would overwrite the manifest itself."""
    names = {SUMMARY_NAME, f"{SUMMARY_NAME}{LOCK_SUFFIX}"}.union(*(stem_file_names(r.stem) for r in man.rows))
    refuse_input_among("manifest", man.path, out_dir, names)


def run_batch(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike,
              options: BatchOptions | None = None, *, models: Models | None = None,
              log: Callable[[str], None] | None = None) -> BatchResult:
    """Segment the manifest's rows (or those selected) into ``out_dir``; see the module docstring.

    Parameters
    ----------
    manifest : Manifest or path-like
        Read and checked with :func:`read_manifest` when a path (every bad row is reported before
        any work starts).
    out_dir : path-like
        Output folder, shared by every process working on the manifest.
    options : BatchOptions
    models : Models, optional
        The models (default: the embedded nucleus model, no gland model); a row's ``weights``
        replaces the nucleus weights given by name; each checkpoint is loaded once.
    log : callable, optional
        Called with one line per slide as it ends.

    Returns
    -------
    BatchResult
        ``ok`` is False when a slide this process handled failed.
    """
    opts = options or BatchOptions()
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = select_rows(man, only=opts.only, task_index=opts.task_index, rows_per_task=opts.rows_per_task)
    refuse_manifest_overwrite(man, out_dir)
    out = ensure_writable_dir(out_dir)
    if opts.segment.qc:
        refuse_foreign_index(out)  # before any work: a user's own OUT/index.html stays
    models = models or Models()
    say = log or (lambda _m: None)
    done: dict[str, SlideResult] = {}
    n = len(rows)
    position = {r.stem: k + 1 for k, r in enumerate(rows)}

    def report(res: SlideResult) -> None:
        k = f"[{position[res.row.stem]}/{n}] {res.row.stem}"
        if res.status == "segmented":
            redone = f"redone: {res.redone}; " if res.redone else ""
            say(f"{k}: {redone}{res.segmented} of {res.clicks} clicks segmented in {res.seconds:.1f} s")
        elif res.status == "complete":
            say(f"{k}: outputs complete, skipped")
        elif res.status == "running":
            say(f"{k}: being segmented by {res.holder or 'another process'}, left to it")
        else:
            say(f"{k}: FAILED: {res.error}")

    def work(row: ManifestRow) -> SlideResult:
        res = process_row(row, out, opts, models)
        done[row.stem] = res
        report(res)
        return res

    with signals_as_interrupt():  # SIGTERM (SLURM) and SIGHUP: locks and temporaries go as for Ctrl-C
        todo = list(rows)
        while todo:
            k = _in_flight(opts) if len(todo) > 1 else 1
            if k == 1:
                for row in todo:
                    work(row)
            else:
                with ThreadPoolExecutor(max_workers=k, thread_name_prefix="nuclick-slide") as pool:
                    futures = [pool.submit(work, row) for row in todo]
                    try:
                        for f in futures:
                            f.result()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
            todo = [r for r in todo if done[r.stem].status == "running"] if opts.wait else []
            if todo:
                time.sleep(opts.poll)

    results = []
    for row in man.rows:
        res = done.get(row.stem)
        if res is None or res.status == "running":
            res = disk_state(row, out, opts)
        results.append(res)
    batch = BatchResult(results=results, selected=[r.stem for r in rows])
    if opts.summary:
        batch.summary_path = write_summary(out, results, stale_after=opts.stale_after)
    if opts.segment.qc:  # OUT/index.html: one row per slide, linking each S.qc.html
        write_index(out, [index_row(out, r.row.stem, r.status, seconds=r.seconds, error=r.error) for r in results])
    return batch


def summary_only(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike,
                 options: BatchOptions | None = None, *, write: bool = True, models: Models | None = None) -> BatchResult:
    """Every row's state from the output folder, without running anything (and the summary file).
    ``models``: also compare each complete row's earlier run with what this batch asks (``--dry-run``,
    see :func:`disk_state`); without, complete outputs are complete whatever they were asked for."""
    opts = options or BatchOptions()
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = select_rows(man, only=opts.only, task_index=opts.task_index, rows_per_task=opts.rows_per_task)
    out = Path(out_dir)
    results = [disk_state(r, out, opts, models if r in rows else None) for r in man.rows]
    batch = BatchResult(results=results, selected=[r.stem for r in rows])
    if write and out.is_dir():
        if opts.segment.qc:
            refuse_foreign_index(out)
        batch.summary_path = write_summary(out, results, stale_after=opts.stale_after)
        if opts.segment.qc:  # index.html as the summary says (a job's own index may predate its neighbours' end)
            write_index(out, [index_row(out, r.row.stem, r.status, error=r.error) for r in results])
    return batch


