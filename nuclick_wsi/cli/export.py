"""``nuclick-wsi export-training``: segment outputs -> a training set (images, instance labels, manifest)."""

from __future__ import annotations

from pathlib import Path

import click

from nuclick_wsi.cli.common import fail_cleanly


@click.command("export-training")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Dataset folder to write (images/, labels/, valid/, geojson/, manifest.json).")
@click.option("--tile", type=click.IntRange(min=32, max=4096), default=256, show_default=True,
              help="Tile side, pixels at the model's um/px.")
@click.option("--roi", "rois", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Areas you clicked completely (GeoJSON/XML polygons); only tiles meeting them are exported. "
                   "Repeat for several slides (each file's name starts with its slide's stem).")
@click.option("--around-outlines", is_flag=True,
              help="Without --roi: tiles around the outlined nuclei; valid/ marks the outlines grown by --grow-um, "
                   "the rest is unknown (an unclicked nucleus may be there) and the manifest says so.")
@click.option("--grow-um", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="--around-outlines: um around each outline counted as known background.")
@click.option("--quiet", "-q", is_flag=True)
@fail_cleanly
def export_training_cmd(out_dir, output, tile, rois, around_outlines, grow_um, quiet) -> None:
    """Turn segment outputs in OUT_DIR (S.report.json + S.geojson per slide) into a training set.

    Tiles are read from each slide by region at the model's um/px. `train DATASET` reads the folder;
    StarDist, Cellpose and HoVer-Net users: see the README (Training sets from outlines).
    """
    from nuclick_wsi.training.export import export_training

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    manifest = export_training(out_dir, output, tile=tile, rois=list(rois), around_outlines=around_outlines,
                               grow_um=grow_um, progress=not quiet, log=log)
    n = sum(t["instances"] for t in manifest["tiles"])
    click.echo(f"{len(manifest['tiles'])} tiles, {n} labelled instances at {manifest['mpp']} um/px in {output}")
