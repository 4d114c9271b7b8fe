"""``nuclick-wsi propose``: a click proposed inside every nucleus the detector finds."""

from __future__ import annotations

from pathlib import Path

import click

from nuclick_wsi.cli.common import device_option, fail_cleanly, slide_read_options


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out_dir", default=Path("."), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder: S.proposals.geojson goes there.")
@click.option("--roi", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Only inside the area annotations (polygons) of this QuPath GeoJSON / ASAP / ImageScope file.")
@click.option("--weights", type=str, default=None, help="Detector checkpoint (default: the embedded detector).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Override the detector's score cut (lower: more proposals, more false ones).")
@click.option("--stem", default=None, help="Output name stem (default: the slide's file name without extension).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Tiles per batch.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 only where the CPU has native bf16 and a probe finds it faster, else fp32.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@device_option()
@slide_read_options
@fail_cleanly
def propose(slide, out_dir, roi, weights, threshold, stem, batch_size, precision, quiet, device, mpp, bounds_offset,
            reader) -> None:
    """Propose a click inside every nucleus on the tissue of SLIDE (QuPath Points of class "Proposed").

    Import OUT/S.proposals.geojson into QuPath, delete wrong points, add missed ones, export, and run
    `segment --points` on the result: a proposal is never an outline.
    """
    from nuclick_wsi.detection.slide import DetectOptions
    from nuclick_wsi.proposals import ProposeOptions, propose as run_propose

    opts = ProposeOptions(detect=DetectOptions(threshold=threshold, batch_size=batch_size, device=device,
                                               precision=precision, progress=not quiet),
                          mpp=mpp, bounds_offset=bounds_offset, reader=reader)
    result = run_propose(slide, out_dir, roi=roi, weights=weights, options=opts, stem=stem)
    s = result.summary
    if not quiet:
        click.echo(f"{s['proposals']} proposals on {s['tissue_mm2']} mm2 of tissue ({s['tiles']} tiles, "
                   f"{s['mp_per_s']} MP/s at 0.25 um/px, {s['precision']}); {result.path}", err=True)
