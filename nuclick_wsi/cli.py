"""The ``nuclick-wsi`` command line: thin Click commands over the Python API."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import NuclickError


def _fail_cleanly(fn):
    """Turn user-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NuclickError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:  # disk full, permissions...: outputs were already cleaned up
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left", err=True)
            sys.exit(130)

    return wrapper


def _formats(ctx, param, value: str) -> tuple[str, ...]:
    from .pipeline import FORMATS

    out = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in out if v not in FORMATS]
    if bad or not out:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(FORMATS)}")
    return out


def slide_options(fn):
    """Options shared by the commands that read slides (and write label stores)."""
    for deco in reversed([
        click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Level-0 um/px of the slide; overrides the file's value."),
        click.option("--bounds-offset/--no-bounds-offset", default=True, show_default=True,
                     help="Use QuPath's frame for slides with OpenSlide bounds (MRXS...); "
                          "--no-bounds-offset for projects that opened slides uncropped."),
        click.option("--reader", type=click.Choice(["auto", "openslide", "tifffile", "pillow", "tiatoolbox"]),
                     default="auto", show_default=True, help="Slide reader."),
        click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.4", show_default=True,
                     help="Label stores: OME-NGFF 0.4 in zarr v2 (QuPath 0.6 reads it) or 0.5 in zarr v3."),
    ]):
        fn = deco(fn)
    return fn


def model_options(fn):
    """Options shared by the commands that run a model."""
    for deco in reversed([
        click.option("--weights", type=str, default=None,
                     help="Model checkpoint (default: the embedded nucleus model), or "
                          "tiatoolbox:nuclick_original-pannuke / tiatoolbox:nuclick_light-pannuke "
                          "(TIAToolbox's weights, extra nuclick-wsi[tiatoolbox])."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="auto: fp16 autocast on CUDA; on CPU bf16 only where the CPU has native bf16 and a probe finds it faster, else fp32."),
    ]):
        fn = deco(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nuclick-wsi")
def main() -> None:
    """NuClick on whole-slide images: clicks in QuPath/ASAP -> nucleus outlines."""


@main.command()
@click.argument("slide", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--points", "-p", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Clicks: QuPath GeoJSON, ASAP XML, ImageScope XML or CSV (x,y[,class]).")
@click.option("--output", "-o", "out_dir", default=Path("."), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--format", "formats", default="qupath", show_default=True, callback=_formats,
              help="Polygon outputs, comma-separated: qupath, asap, geoparquet.")
@click.option("--object-type", type=click.Choice(["detection", "annotation", "cell"]), default="detection",
              show_default=True, help="QuPath object type of the results.")
@click.option("--gzip", is_flag=True, help="Write the GeoJSON gzipped (S.geojson.gz).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Override the model's probability threshold.")
@click.option("--min-object-px", type=click.FloatRange(min=0), default=None, help="Override: smallest object, model pixels.")
@click.option("--min-hole-px", type=click.FloatRange(min=0), default=None, help="Override: holes smaller than this are filled.")
@click.option("--stem", default=None, help="Output name stem (default: the slide's file name without extension).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--roi", is_flag=True, help="Only clicks inside the file's area annotations (polygons); others are reported.")
@click.option("--task", type=click.Choice(["nuclei", "gland"]), default="nuclei", show_default=True,
              help="What --weights (and --threshold, --min-*-px) are for: a nucleus model, or a gland model for "
                   "the squiggles (lines) of POINTS.")
@click.option("--gland-weights", type=str, default=None,
              help="Gland model for the squiggles (lines) of POINTS, beside the nucleus model (see README: Glands).")
@click.option("--squiggle-group", "squiggle_groups", multiple=True, metavar="NAME",
              help="ASAP group / ImageScope layer whose lines are squiggles (repeatable; QuPath lines always are).")
@slide_options
@model_options
@_fail_cleanly
def segment(slide, points, out_dir, formats, object_type, gzip, threshold, min_object_px, min_hole_px, stem, quiet,
            roi, task, gland_weights, squiggle_groups, mpp, bounds_offset, reader, ngff, weights, device,
            batch_size, precision) -> None:
    """Segment the nucleus under every click, and the gland along every squiggle (line), of POINTS on SLIDE."""
    from .pipeline import SegmentOptions, segment as run_segment

    opts = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, bounds_offset=bounds_offset, reader=reader,
                          device=device, precision=precision, batch_size=batch_size, threshold=threshold,
                          min_object_px=min_object_px, min_hole_px=min_hole_px, gzip=gzip, progress=not quiet,
                          roi=roi, task=task, squiggle_groups=squiggle_groups, ngff=ngff)
    result = run_segment(slide, points, out_dir, options=opts, weights=weights, stem=stem, gland_weights=gland_weights)
    t = result.report["totals"]
    if not quiet:
        click.echo(f"{t['segmented']} of {t['clicks']} clicks segmented ({result.report['timings_s']['nuclei_per_s']} nuclei/s); "
                   f"outputs in {out_dir}", err=True)
        for reason, n in t["skipped_by_reason"].items():
            click.echo(f"  skipped {n}: {reason}", err=True)
        if "squiggles" in t:
            click.echo(f"{t['glands_segmented']} of {t['squiggles']} squiggles segmented (glands)", err=True)
            for reason, n in t["glands_skipped_by_reason"].items():
                click.echo(f"  skipped {n}: {reason}", err=True)


@main.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (best on validation); OUTPUT.last.pt holds the resumable state.")
@click.option("--task", type=click.Choice(["nuclei", "gland"]), default="nuclei", show_default=True)
@click.option("--arch", type=click.Choice(["s2d-unet", "light-unet", "nuclick"]), default="s2d-unet", show_default=True)
@click.option("--widths", default="16,32,64,128", show_default=True, help="s2d-unet / light-unet encoder widths.")
@click.option("--loss", type=click.Choice(["calibrated", "nuclick"]), default="calibrated", show_default=True,
              help="calibrated: Dice + BCE weighted 1 everywhere and 3 on other nuclei; nuclick: the paper's a^2 weight map.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 only where measured faster (as segment chooses).")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--samples-per-epoch", type=click.IntRange(min=1), default=None,
              help="Default: one per clickable object.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 64 (nuclei), 16 (gland).")
@click.option("--patch-size", type=click.IntRange(min=16), default=None, help="Default: 128 (nuclei), 512 (gland).")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.25, show_default=True,
              help="um/px the model works at (the training images' resolution).")
@click.option("--val", "val_tiles", default="", help="Comma-separated image names held out for validation.")
@click.option("--exclude", default="", help="Comma-separated image names never used (your test tiles).")
@click.option("--no-binary-masks", is_flag=True, help="Ignore binary-mask-only images.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget: the learning-rate schedule anneals to end on time.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@_fail_cleanly
def train(data, output, task, arch, widths, epochs, samples_per_epoch, batch_size, patch_size, lr, mpp, val_tiles,
          exclude, no_binary_masks, max_minutes, device, seed, quiet, loss="calibrated", precision="auto") -> None:
    """Train a NuClick model on DATA folders (MoNuSeg layout, label images, GeoJSON outlines).

    --task gland: instance label images, one id per gland (GlaS: NAME.bmp + NAME_anno.bmp); squiggles
    are sampled from each gland (README: Glands).
    """
    from .training.train import TrainConfig, train as run_train

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    cfg = TrainConfig(data=[str(d) for d in data], output=str(output), task=task, arch=arch,
                      widths=[int(w) for w in split(widths)], epochs=epochs, samples_per_epoch=samples_per_epoch,
                      batch_size=batch_size, patch_size=patch_size, lr=lr, mpp=mpp, device=device, seed=seed,
                      val=split(val_tiles),
                      exclude=split(exclude), max_minutes=max_minutes, use_binary_masks=not no_binary_masks,
                      loss=loss, precision=precision)
    result = run_train(cfg, progress=not quiet, log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    click.echo(f"best validation IoU {result['best_val_iou']:.4f}; weights in {output}")


@main.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--weights", default=None, help="Checkpoint to evaluate (default: the embedded model).")
@click.option("--tiles", default="", help="Comma-separated image names to evaluate (default: every outlined image).")
@click.option("--jitter", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Move each click by N(0, JITTER) px inside its nucleus.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="um/px of the images when their annotation files do not say.")
@click.option("--no-baselines", is_flag=True, help="Skip the disk and watershed baselines.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@_fail_cleanly
def evaluate(data, weights, tiles, jitter, mpp, no_baselines, json_out, seed, device) -> None:
    """Score a model with the NuClick protocol (a click per ground-truth nucleus): AJI, Dice, DQ, SQ, PQ, Hausdorff."""
    from .evaluate import evaluate as run_eval, format_table, load_eval_tiles
    from .models.weights import load_model
    from .pipeline import SegmentOptions

    names = [t.strip() for t in tiles.split(",") if t.strip()]
    found = load_eval_tiles([str(d) for d in data], names or None)
    missing = sorted(set(names) - {t.name for t in found})
    if missing:
        raise NuclickError(f"no outlined tiles named {', '.join(missing)} in {', '.join(map(str, data))}")
    if not found:
        raise NuclickError(f"no tiles with instance outlines in {', '.join(map(str, data))}")
    model = load_model(weights)
    result = run_eval(found, model, mpp=mpp, jitter=jitter, seed=seed, baselines=not no_baselines,
                      options=SegmentOptions(progress=False, duplicate_px=0, device=device), progress=True)
    click.echo(format_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    if json_out:
        from .atomic import atomic_output

        with atomic_output(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")


@main.group()
def qupath() -> None:
    """QuPath projects: segment the clicks exported from every image of a project."""


@qupath.command("run")
@click.argument("project", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "formats", default="qupath", show_default=True, callback=_formats,
              help="Polygon outputs besides QuPath GeoJSON, comma-separated: qupath, asap, geoparquet.")
@click.option("--object-type", type=click.Choice(["detection", "annotation", "cell"]), default="detection",
              show_default=True, help="QuPath object type of the results.")
@click.option("--roi", is_flag=True, help="Only clicks inside each image's exported area annotations.")
@click.option("--force", is_flag=True, help="Redo images whose results are complete.")
@click.option("--gland-weights", type=str, default=None,
              help="Gland model for the squiggles (line annotations), if the clicks have any.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary.")
@slide_options
@model_options
@_fail_cleanly
def qupath_run(project, formats, object_type, roi, force, gland_weights, quiet, mpp, bounds_offset, reader, ngff,
               weights, device, batch_size, precision) -> None:
    """Segment PROJECT/nuclick/clicks/<image>.geojson for each image of PROJECT (project.qpproj or its folder).

    Results go to PROJECT/nuclick/results/<image>.geojson (+ .labels.zarr, .report.json) for
    workflows/qupath/import_results.groovy. The frame of each image follows how QuPath opened it
    (OpenSlide crops to openslide.bounds-*, unless --no-crop); --bounds-offset/--no-bounds-offset
    force one frame for all. Exit status 1 if any image failed.
    """
    from .pipeline import SegmentOptions
    from .qupath_project import read_project, run_project

    ctx = click.get_current_context()
    forced = None if ctx.get_parameter_source("bounds_offset") == click.core.ParameterSource.DEFAULT else bounds_offset
    proj = read_project(project)
    opts = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, reader=reader, device=device,
                          precision=precision, batch_size=batch_size, progress=False, roi=roi, ngff=ngff)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    run = run_project(proj, options=opts, weights=weights, gland_weights=gland_weights, bounds_offset=forced,
                      force=force, log=log)
    counts = run.counts()
    parts = [f"{counts.get(k, 0)} {k}" for k in ("segmented", "complete", "no clicks", "failed") if counts.get(k)]
    click.echo(f"{proj.file}: {len(run.images)} image(s): {', '.join(parts) or 'nothing to do'}"
               + (f"; summary in {run.summary_path}" if run.summary_path else ""), err=True)
    for o in run.failed:
        click.echo(f"  FAILED {o.name}: {o.message}", err=True)
    if run.failed:
        ctx.exit(1)


# --------------------------------------------------------------------------------------------------
# cohorts: batch + manifest (logic in cohort.py)


def _batch_output_options(fn):
    """The output and post-processing options of ``segment``, for ``batch``."""
    for deco in reversed([
        click.option("--format", "formats", default="qupath", show_default=True, callback=_formats,
                     help="Polygon outputs, comma-separated: qupath, asap, geoparquet."),
        click.option("--object-type", type=click.Choice(["detection", "annotation", "cell"]), default="detection",
                     show_default=True, help="QuPath object type of the results."),
        click.option("--gzip", is_flag=True, help="Write the GeoJSON gzipped (S.geojson.gz)."),
        click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Override the model's threshold."),
        click.option("--min-object-px", type=click.FloatRange(min=0), default=None,
                     help="Override: smallest object, model pixels."),
        click.option("--min-hole-px", type=click.FloatRange(min=0), default=None,
                     help="Override: holes smaller than this are filled."),
    ]):
        fn = deco(fn)
    return fn


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (OUT/<stem>.* per row, OUT/batch-summary.csv).")
@_batch_output_options
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
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the summary table.")
@slide_options
@model_options
@_fail_cleanly
def batch(manifest, out_dir, formats, object_type, gzip, threshold, min_object_px, min_hole_px, only, task_index,
          rows_per_task, wait, stale_lock_after, slides_in_flight, gland_weights, no_summary, summary_only, dry_run, quiet, mpp,
          bounds_offset, reader, ngff, weights, device, batch_size, precision) -> None:
    """Segment every row of MANIFEST (CSV: slide,points[,mpp,weights,stem]) into OUT/<stem>.*.

    Every row is checked before any work starts. Slides whose outputs are complete are skipped, so a
    rerun resumes; a failed slide is recorded (OUT/<stem>.failed.json) and the others go on. Several
    processes (or SLURM array tasks) may run on one manifest and folder: lock files keep them off
    each other's slides. Exit status 1 if a slide failed.
    """
    from .cohort import BatchOptions, ManifestError, format_summary, read_manifest, run_batch, summary_only as state
    from .pipeline import SegmentOptions

    try:
        man = read_manifest(manifest)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    if man.ignored_columns and not quiet:
        click.echo(f"{manifest}: ignoring column(s) {', '.join(man.ignored_columns)}", err=True)
    seg = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, bounds_offset=bounds_offset, reader=reader,
                         device=device, precision=precision, batch_size=batch_size, threshold=threshold,
                         min_object_px=min_object_px, min_hole_px=min_hole_px, gzip=gzip, progress=False, ngff=ngff)
    opts = BatchOptions(segment=seg, weights=weights, gland_weights=gland_weights, only=only, task_index=task_index, rows_per_task=rows_per_task,
                        stale_after=stale_lock_after, wait=wait, slides_in_flight=slides_in_flight,
                        summary=not no_summary)
    if dry_run or summary_only:
        res = state(man, out_dir, opts, write=summary_only)
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
    res = run_batch(man, out_dir, opts, log=log)
    click.echo(format_summary([r for r in res.results if r.row.stem in set(res.selected)]))
    if res.summary_path is not None and not quiet:
        click.echo(f"summary: {res.summary_path}", err=True)
    elif opts.summary and res.summary_path is None:
        click.echo(f"summary not written: {out_dir / 'batch-summary.csv.lock'} stayed locked", err=True)
    if not res.ok:
        sys.exit(1)


@main.command("manifest")
@click.option("--from-qupath", "project", required=True, type=click.Path(path_type=Path),
              help="A QuPath project (project.qpproj or its folder) whose clicks were exported to "
                   "PROJECT/nuclick/clicks/<image>.geojson.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV.")
@click.option("--slide-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Find every slide here by its file name (the project was made on another machine).")
@_fail_cleanly
def manifest_cmd(project, output, slide_dir) -> None:
    """Write a batch manifest for the images of a QuPath project that have exported clicks.

    One row per image with PROJECT/nuclick/clicks/<image>.geojson; the stem is the image's file
    name (results import back with workflows/qupath/import_results.groovy), bounds_offset the frame
    QuPath used for the image, mpp the project's um/px where the slide file has none.
    """
    from .cohort import manifest_from_qupath, write_manifest

    rows, notes = manifest_from_qupath(project, slide_dir=slide_dir)
    for note in notes:
        click.echo(f"  {note}", err=True)
    if not rows:
        raise click.ClickException(f"{project}: no image has exported clicks (run workflows/qupath/export_clicks.groovy)")
    write_manifest(output, rows)
    click.echo(f"{output}: {len(rows)} row(s)" + (f"; {len(notes)} note(s) above" if notes else ""), err=True)



if __name__ == "__main__":  # pragma: no cover
    main()
