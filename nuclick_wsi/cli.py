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
    """Options shared by the commands that read slides."""
    for deco in reversed([
        click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Level-0 um/px of the slide; overrides the file's value."),
        click.option("--bounds-offset/--no-bounds-offset", default=True, show_default=True,
                     help="Use QuPath's frame for slides with OpenSlide bounds (MRXS...); "
                          "--no-bounds-offset for projects that opened slides uncropped."),
        click.option("--reader", type=click.Choice(["auto", "openslide", "tifffile", "pillow", "tiatoolbox"]),
                     default="auto", show_default=True, help="Slide reader."),
    ]):
        fn = deco(fn)
    return fn


def model_options(fn):
    """Options shared by the commands that run a model."""
    for deco in reversed([
        click.option("--weights", type=str, default=None,
                     help="Model checkpoint (default: the embedded nucleus model)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="auto: fp16 autocast on CUDA, bf16 on CPU for the light network."),
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
@slide_options
@model_options
@_fail_cleanly
def segment(slide, points, out_dir, formats, object_type, gzip, threshold, min_object_px, min_hole_px, stem, quiet,
            mpp, bounds_offset, reader, weights, device, batch_size, precision) -> None:
    """Segment the nucleus under every click of POINTS on SLIDE."""
    from .pipeline import SegmentOptions, segment as run_segment

    opts = SegmentOptions(formats=formats, object_type=object_type, mpp=mpp, bounds_offset=bounds_offset, reader=reader,
                          device=device, precision=precision, batch_size=batch_size, threshold=threshold,
                          min_object_px=min_object_px, min_hole_px=min_hole_px, gzip=gzip, progress=not quiet)
    result = run_segment(slide, points, out_dir, options=opts, weights=weights, stem=stem)
    t = result.report["totals"]
    if not quiet:
        click.echo(f"{t['segmented']} of {t['clicks']} clicks segmented ({result.report['timings_s']['nuclei_per_s']} nuclei/s); "
                   f"outputs in {out_dir}", err=True)
        for reason, n in t["skipped_by_reason"].items():
            click.echo(f"  skipped {n}: {reason}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
