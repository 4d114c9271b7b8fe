"""``nuclick-wsi qupath``: QuPath projects."""

from __future__ import annotations

from pathlib import Path

import click

from nuclick_wsi.cli.common import (fail_cleanly, format_option, full_option, model_options, object_type_option,
                                    qc_option, slide_options, watch_option)


@click.group()
def qupath() -> None:
    """QuPath projects: segment the clicks exported from every image of a project."""


@qupath.command("run")
@click.argument("project", type=click.Path(exists=True, path_type=Path))
@format_option("Polygon outputs besides QuPath GeoJSON, comma-separated: qupath, asap, geoparquet.")
@object_type_option()
@click.option("--roi", is_flag=True, help="Only clicks inside each image's exported area annotations.")
@click.option("--force", is_flag=True, help="Redo every image, also those whose results are complete and made with the same options "
                                         "(other weights, object type, formats... redo an image without it).")
@click.option("--gland-weights", type=str, default=None,
              help="Gland model for the squiggles (line annotations), if the clicks have any.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary.")
@qc_option()
@full_option()
@watch_option()
@slide_options
@model_options
@fail_cleanly
def qupath_run(project, formats, object_type, roi, force, gland_weights, quiet, mpp, bounds_offset, reader, ngff,
               weights, device, batch_size, precision, qc=True, tta=False, runtime="auto", full=False, watch=False) -> None:
    """Segment PROJECT/nuclick/clicks/<image>.geojson for each image of PROJECT (project.qpproj or its folder).

    Results go to PROJECT/nuclick/results/<image>.geojson (+ .labels.zarr, .report.json) for
    workflows/qupath/import_results.groovy. The frame of each image follows how QuPath opened it
    (OpenSlide crops to openslide.bounds-*, unless --no-crop); --bounds-offset/--no-bounds-offset
    force one frame for all. Exit status 1 if any image failed.
    """
    from nuclick_wsi.pipeline import Models, SegmentOptions
    from nuclick_wsi.workflows.qupath_project import read_project, run_project

    ctx = click.get_current_context()
    forced = None if ctx.get_parameter_source("bounds_offset") == click.core.ParameterSource.DEFAULT else bounds_offset
    proj = read_project(project)
    opts = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, reader=reader, device=device,
                          precision=precision, tta=tta, runtime=runtime, batch_size=batch_size, progress=False, roi=roi, ngff=ngff, qc=qc,
                          full=full)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    models = Models.from_flags(weights, gland_weights)
    if watch:
        from nuclick_wsi.workflows.watch import watch_project

        watch_project(proj, options=opts, models=models, bounds_offset=forced, force=force,
                      say=lambda line: click.echo(line, err=True))
        return
    run = run_project(proj, options=opts, models=models, bounds_offset=forced, force=force, log=log)
    counts = run.counts()
    parts = [f"{counts.get(k, 0)} {k}" for k in ("segmented", "complete", "no clicks", "failed") if counts.get(k)]
    click.echo(f"{proj.file}: {len(run.images)} image(s): {', '.join(parts) or 'nothing to do'}"
               + (f"; summary in {run.summary_path}" if run.summary_path else ""), err=True)
    for o in run.failed:
        click.echo(f"  FAILED {o.name}: {o.message}", err=True)
    if run.failed:
        ctx.exit(1)
