"""Shared pieces of the commands: one-line errors, and option factories used by several commands."""

from __future__ import annotations

import functools
import sys

import click

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.annotations.qupath import OBJECT_TYPES
from nuclick_wsi.io.slides.resolution import mpp_problem
from nuclick_wsi.outputs.paths import POLYGON_SUFFIXES
from nuclick_wsi.outputs.signals import exit_status, signals_as_interrupt


def fail_cleanly(fn):
    """Turn user-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals_as_interrupt():  # SIGTERM (SLURM) and SIGHUP: the same clean-up as Ctrl-C
                return fn(*args, **kwargs)
        except NuclickError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:  # disk full, permissions...: outputs were already cleaned up
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        except KeyboardInterrupt as exc:
            click.echo("interrupted; nothing half-written was left", err=True)
            sys.exit(exit_status(exc))

    return wrapper


def parse_formats(ctx, param, value: str) -> tuple[str, ...]:
    out = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in out if v not in POLYGON_SUFFIXES]
    if bad or not out:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(POLYGON_SUFFIXES)}")
    return out


def _apply(fn, decorators):
    for deco in reversed(decorators):
        fn = deco(fn)
    return fn


def device_option():
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)


def format_option(help: str = "Polygon outputs, comma-separated: qupath, asap, geoparquet."):
    return click.option("--format", "formats", default="qupath", show_default=True, callback=parse_formats, help=help)


def object_type_option():
    return click.option("--object-type", type=click.Choice(list(OBJECT_TYPES)), default="detection",
                        show_default=True, help="QuPath object type of the results.")


def check_mpp(ctx, param, value: float | None) -> float | None:
    """``--mpp``: the one plausible um/px range of the readers and batch manifests."""
    if value is not None and mpp_problem(value):
        raise click.BadParameter(mpp_problem(value))
    return value


def qc_option():
    """--qc/--no-qc of segment, batch and qupath run (the report itself: nuclick_wsi.qc)."""
    return click.option("--qc/--no-qc", default=True, show_default=True,
                        help="Write S.qc.html (pictures to check) and S.review.geojson (doubtful outlines) per slide; "
                             "batch and qupath run also index.html (one row per slide).")


def full_option():
    """--full of segment, batch and qupath run (reruns: nuclick_wsi.engine.rerun)."""
    return click.option("--full", is_flag=True,
                        help="Recompute every click with a fresh id table (ids in click order), ignoring an earlier "
                             "run in the output folder; by default a rerun keeps each click's id and uuid and "
                             "recomputes only the clicks an edit of the clicks file can change.")


def watch_option():
    """--watch of segment and qupath run (nuclick_wsi.workflows.watch)."""
    return click.option("--watch", is_flag=True,
                        help="Keep running: after the run, rerun (incrementally, with the model already loaded) "
                             "whenever the clicks are exported again; Ctrl-C stops.")


def slide_read_options(fn):
    """Options shared by the commands that read slides: --mpp, --bounds-offset, --reader."""
    return _apply(fn, [
        click.option("--mpp", type=float, default=None, callback=check_mpp,
                     help="Level-0 um/px of the slide; overrides the file's value."),
        click.option("--bounds-offset/--no-bounds-offset", default=True, show_default=True,
                     help="Use QuPath's frame for slides with OpenSlide bounds (MRXS...); "
                          "--no-bounds-offset for projects that opened slides uncropped."),
        click.option("--reader", type=click.Choice(["auto", "openslide", "tifffile", "pillow", "tiatoolbox"]),
                     default="auto", show_default=True, help="Slide reader."),
    ])


def slide_options(fn):
    """Options shared by the commands that read slides and write label stores."""
    return _apply(slide_read_options(fn), [
        click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.4", show_default=True,
                     help="Label stores: OME-NGFF 0.4 in zarr v2 (QuPath 0.6 reads it) or 0.5 in zarr v3."),
    ])


def model_options(fn):
    """Options shared by the commands that run a model."""
    return _apply(fn, [
        click.option("--weights", type=str, default=None,
                     help="Model checkpoint (default: the embedded nucleus model), or "
                          "tiatoolbox:nuclick_original-pannuke / tiatoolbox:nuclick_light-pannuke "
                          "(TIAToolbox's weights, extra nuclick-wsi[tiatoolbox])."),
        device_option(),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: fp16 autocast on CUDA; on CPU bf16 only where the CPU has "
                                             "native bf16 and a probe finds it faster, else fp32."),
        click.option("--runtime", type=click.Choice(["auto", "torch", "openvino"]), default="auto", show_default=True,
                     help="CPU inference runtime: auto times PyTorch and OpenVINO (when installed) once per machine "
                          "and keeps the faster."),
        click.option("--tta", is_flag=True,
                     help="Test-time augmentation: each patch's probability is the mean over 4 flips (about 4x "
                          "slower; README: Model)."),
    ])


def output_options(fn):
    """The polygon outputs and post-processing overrides of ``segment`` and ``batch``."""
    return _apply(fn, [
        format_option(),
        object_type_option(),
        click.option("--gzip", is_flag=True, help="Write the GeoJSON gzipped (S.geojson.gz)."),
        click.option("--threshold", type=click.FloatRange(0, 1), default=None,
                     help="Override the model's probability threshold."),
        click.option("--min-object-px", type=click.FloatRange(min=0), default=None,
                     help="Override: smallest object, model pixels."),
        click.option("--min-hole-px", type=click.FloatRange(min=0), default=None,
                     help="Override: holes smaller than this are filled."),
    ])
