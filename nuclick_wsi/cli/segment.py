"""``nuclick-wsi segment``: one slide."""

from __future__ import annotations

from pathlib import Path

import click

from nuclick_wsi.cli.common import (fail_cleanly, full_option, model_options, output_options, qc_option, slide_options,
                                    watch_option)


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))  # a folder: OME-Zarr (the readers decide)
@click.option("--points", "-p", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Clicks: QuPath GeoJSON, ASAP XML, ImageScope XML or CSV (x,y[,class]).")
@click.option("--output", "-o", "out_dir", default=Path("."), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@output_options
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
@qc_option()
@full_option()
@watch_option()
@slide_options
@model_options
@fail_cleanly
def segment(slide, points, out_dir, formats, object_type, gzip, threshold, min_object_px, min_hole_px, stem, quiet,
            roi, task, gland_weights, squiggle_groups, mpp, bounds_offset, reader, ngff, weights, device,
            batch_size, precision, qc=True, tta=False, runtime="auto", full=False, watch=False) -> None:
    """Segment the nucleus under every click, and the gland along every squiggle (line), of POINTS on SLIDE."""
    from nuclick_wsi.pipeline import Models, SegmentOptions, segment as run_segment

    opts = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, bounds_offset=bounds_offset, reader=reader,
                          device=device, precision=precision, tta=tta, runtime=runtime, batch_size=batch_size, gzip=gzip, progress=not quiet,
                          roi=roi, squiggle_groups=squiggle_groups, ngff=ngff, qc=qc, full=full)
    models = Models.from_flags(weights, gland_weights, task=task, threshold=threshold, min_object_px=min_object_px,
                               min_hole_px=min_hole_px)
    if watch:
        from nuclick_wsi.workflows.watch import watch_segment

        watch_segment(slide, points, out_dir, options=opts, models=models, stem=stem,
                      say=lambda line: click.echo(line, err=True))
        return
    result = run_segment(slide, points, out_dir, options=opts, models=models, stem=stem)
    if qc and "qupath" not in formats:
        click.echo("no QC report: it reads the QuPath outlines (add qupath to --format)", err=True)
    t = result.report["totals"]
    if not quiet:
        click.echo(f"{t['segmented']} of {t['clicks']} clicks segmented ({result.report['timings_s']['nuclei_per_s']} nuclei/s); "
                   f"outputs in {out_dir}", err=True)
        for reason, n in t["skipped_by_reason"].items():
            click.echo(f"  skipped {n}: {reason}", err=True)
        rerun = result.report.get("rerun")
        if rerun:
            click.echo(f"incremental rerun: {rerun['reused']} reused, {rerun['recomputed']} recomputed, "
                       f"{rerun['taken']} outlines kept without stitching" if
                       rerun["mode"] == "incremental" else f"full run: {rerun['why_full']}", err=True)
        if "squiggles" in t:
            click.echo(f"{t['glands_segmented']} of {t['squiggles']} squiggles segmented (glands)", err=True)
            for reason, n in t["glands_skipped_by_reason"].items():
                click.echo(f"  skipped {n}: {reason}", err=True)
