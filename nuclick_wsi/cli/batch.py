"""``nuclick-wsi batch`` and ``nuclick-wsi manifest``: cohorts (logic in :mod:`nuclick_wsi.workflows.cohort`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nuclick_wsi.cli.common import fail_cleanly, full_option, model_options, output_options, qc_option, slide_options


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (OUT/<stem>.* per row, OUT/batch-summary.csv).")
@output_options
@click.option("--only", multiple=True, metavar="STEM", help="Only the row with this stem (repeatable).")
@click.option("--task-index", type=click.IntRange(min=0), default=None,
              help="Only row N (0-based), e.g. $SLURM_ARRAY_TASK_ID; with --rows-per-task K rows N*K..N*K+K-1.")
@click.option("--rows-per-task", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for rows that another process is segmenting (instead of leaving them to it).")
@click.option("--stale-lock-after", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds without a heartbeat after which a slide's lock is stale (a dead process on this "
                   "host is noticed at once).")
@click.option("--slides-in-flight", type=click.IntRange(min=1), default=None,
              help="Slides segmented at once, sharing the model (default: 2 on a GPU, 1 on the CPU).")
@click.option("--gland-weights", default=None,
              help="Gland model for manifest rows whose annotation files hold squiggles (lines).")
@click.option("--no-summary", is_flag=True, help="Do not write OUT/batch-summary.csv.")
@click.option("--summary-only", is_flag=True,
              help="Run nothing: write OUT/batch-summary.csv from what is there; exit 1 unless every row is complete.")
@click.option("--dry-run", "-n", is_flag=True, help="Check the manifest and show what would run; write nothing.")
@click.option("--propose", is_flag=True,
              help="Instead of segmenting: proposed clicks for every row's slide into OUT/proposals/<stem>.proposals.geojson "
                   "(nuclick-wsi propose; the points column is not read).")
@click.option("--detector-weights", default=None, help="With --propose: detector checkpoint (default: the embedded one).")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the summary table.")
@qc_option()
@full_option()
@slide_options
@model_options
@fail_cleanly
def batch(manifest, out_dir, formats, object_type, gzip, threshold, min_object_px, min_hole_px, only, task_index,
          rows_per_task, wait, stale_lock_after, slides_in_flight, gland_weights, no_summary, summary_only, dry_run, quiet, mpp,
          bounds_offset, reader, ngff, weights, device, batch_size, precision, qc=True, tta=False, runtime="auto", full=False,
          propose=False, detector_weights=None) -> None:
    """Segment every row of MANIFEST (CSV: slide,points[,mpp,weights,stem]) into OUT/<stem>.*.

    Every row is checked before any work starts. Slides whose outputs are complete, and were made with
    the same options (model, thresholds, formats, um/px, frame...; not device or batch size), are
    skipped, so a rerun resumes (--full redoes every slide); a failed slide is recorded (OUT/<stem>.failed.json) and the others go on. Several
    processes (or SLURM array tasks) may run on one manifest and folder: lock files keep them off
    each other's slides. Exit status 1 if a slide failed.
    """
    from nuclick_wsi.pipeline import Models, SegmentOptions
    from nuclick_wsi.workflows.cohort import (BatchOptions, ManifestError, format_summary, read_manifest,
                                                    run_batch, summary_only as state)

    try:
        man = read_manifest(manifest)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    if man.ignored_columns and not quiet:
        click.echo(f"{manifest}: ignoring column(s) {', '.join(man.ignored_columns)}", err=True)
    if propose:
        return _propose(man, out_dir, detector_weights, only=only, task_index=task_index, rows_per_task=rows_per_task,
                        mpp=mpp, bounds_offset=bounds_offset, reader=reader, device=device, precision=precision,
                        quiet=quiet)
    seg = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, bounds_offset=bounds_offset, reader=reader,
                         device=device, precision=precision, tta=tta, runtime=runtime, batch_size=batch_size, gzip=gzip, progress=False, ngff=ngff, qc=qc,
                         full=full)
    models = Models.from_flags(weights, gland_weights, threshold=threshold, min_object_px=min_object_px,
                               min_hole_px=min_hole_px)
    opts = BatchOptions(segment=seg, only=only, task_index=task_index, rows_per_task=rows_per_task,
                        stale_after=stale_lock_after, wait=wait, slides_in_flight=slides_in_flight,
                        summary=not no_summary)
    if dry_run or summary_only:
        res = state(man, out_dir, opts, write=summary_only, models=models if dry_run else None)
        shown = [r for r in res.results if r.row.stem in set(res.selected)]
        todo = [r for r in shown if r.status != "complete"]
        click.echo(format_summary(shown))
        if dry_run:
            click.echo(f"{len(man)} rows checked; {len(todo)} of the {len(res.selected)} selected would be segmented "
                       f"(array jobs: sbatch --array=0-{max(0, -(-len(man) // rows_per_task) - 1)})", err=True)
        elif todo:
            sys.exit(1)
        return
    log = None if quiet else (lambda line: click.echo(line, err=True))
    res = run_batch(man, out_dir, opts, models=models, log=log)
    click.echo(format_summary([r for r in res.results if r.row.stem in set(res.selected)]))
    if res.summary_path is not None and not quiet:
        click.echo(f"summary: {res.summary_path}", err=True)
    elif opts.summary and res.summary_path is None:
        click.echo(f"summary not written: {out_dir / 'batch-summary.csv.lock'} stayed locked", err=True)
    if not res.ok:
        sys.exit(1)


@click.command("manifest")
@click.option("--from-qupath", "project", required=True, type=click.Path(path_type=Path),
              help="A QuPath project (project.qpproj or its folder) whose clicks were exported to "
                   "PROJECT/nuclick/clicks/<image>.geojson.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV.")
@click.option("--slide-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Find every slide here by its file name (the project was made on another machine).")
@fail_cleanly
def manifest_cmd(project, output, slide_dir) -> None:
    """Write a batch manifest for the images of a QuPath project that have exported clicks.

    One row per image with PROJECT/nuclick/clicks/<image>.geojson; the stem is the image's file
    name (results import back with workflows/qupath/import_results.groovy), bounds_offset the frame
    QuPath used for the image, mpp the project's um/px where the slide file has none.
    """
    from nuclick_wsi.errors import OutputError
    from nuclick_wsi.outputs.safety import real
    from nuclick_wsi.workflows.cohort import manifest_from_qupath, write_manifest

    rows, notes = manifest_from_qupath(project, slide_dir=slide_dir)
    for note in notes:
        click.echo(f"  {note}", err=True)
    if not rows:
        raise click.ClickException(f"{project}: no image has exported clicks (run workflows/qupath/export_clicks.groovy)")
    inputs = {"QuPath project": project / "project.qpproj" if project.is_dir() else project}
    for k, row in enumerate(rows, 1):
        inputs.update({f"slide of row {k}": row["slide"], f"clicks file of row {k}": row["points"]})
    for role, given in inputs.items():
        if real(given) == real(output):
            raise OutputError(f"-o {output} would overwrite the {role} {given}; choose another -o")
    write_manifest(output, rows)
    click.echo(f"{output}: {len(rows)} row(s)" + (f"; {len(notes)} note(s) above" if notes else ""), err=True)


def _propose(man, out_dir, detector_weights, *, only, task_index, rows_per_task, quiet, **opts) -> None:
    """``batch --propose``: one line per row, exit status 1 if a row failed."""
    from nuclick_wsi.detection.slide import DetectOptions
    from nuclick_wsi.proposals import ProposeOptions
    from nuclick_wsi.workflows.cohort.propose import run_propose_batch

    options = ProposeOptions(detect=DetectOptions(device=opts.pop("device"), precision=opts.pop("precision"),
                                                  progress=False), **opts)
    rows = run_propose_batch(man, out_dir, options, weights=detector_weights, only=only, task_index=task_index,
                             rows_per_task=rows_per_task,
                             log=None if quiet else (lambda line: click.echo(line, err=True)))
    for r in rows:
        click.echo(f"{r.stem}\t{r.status}\t{'' if r.proposals is None else r.proposals}\t{r.error}".rstrip())
    if any(r.status == "failed" for r in rows):
        sys.exit(1)
