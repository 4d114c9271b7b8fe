"""``nuclick-wsi evaluate``: score a model with the NuClick protocol."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nuclick_wsi.cli.common import device_option, fail_cleanly
from nuclick_wsi.errors import NuclickError


@click.command()
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
@click.option("--scale", type=click.FloatRange(min=0.1, max=1.0), default=1.0, show_default=True,
              help="Read the tiles at SCALE times their resolution first (0.5: a 40x tile as a 20x scan gives it).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(["auto", "torch", "openvino"]), default="auto", show_default=True)
@click.option("--tta", is_flag=True, help="Test-time augmentation: mean over 4 flips (4x the network's work).")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option()
@fail_cleanly
def evaluate(data, weights, tiles, jitter, mpp, no_baselines, json_out, seed, device, scale=1.0, precision="auto",
             tta=False, runtime="auto") -> None:
    """Score a model with the NuClick protocol (a click per ground-truth nucleus): AJI, Dice, DQ, SQ, PQ, Hausdorff."""
    from nuclick_wsi.evaluation.protocol import evaluate as run_eval, format_table, load_eval_tiles
    from nuclick_wsi.model.weights import load_model
    from nuclick_wsi.pipeline import Models, SegmentOptions

    names = [t.strip() for t in tiles.split(",") if t.strip()]
    found = load_eval_tiles([str(d) for d in data], names or None)
    missing = sorted(set(names) - {t.name for t in found})
    if missing:
        raise NuclickError(f"no outlined tiles named {', '.join(missing)} in {', '.join(map(str, data))}")
    if not found:
        raise NuclickError(f"no tiles with instance outlines in {', '.join(map(str, data))}")
    model = Models(nuclei=load_model(weights)).get("nuclei")  # a gland model or a detector: segment's error
    result = run_eval(found, model, mpp=mpp, jitter=jitter, seed=seed, baselines=not no_baselines,
                      options=SegmentOptions(progress=False, duplicate_px=0, device=device, precision=precision,
                                             tta=tta, runtime=runtime),
                      progress=True, scale=scale)
    click.echo(format_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    if json_out:
        from nuclick_wsi._util.fs import atomic_output

        with atomic_output(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
