"""``nuclick-wsi train``: train a model."""

from __future__ import annotations

from pathlib import Path

import click

from nuclick_wsi.cli.common import check_mpp, device_option, fail_cleanly
from nuclick_wsi.errors import NuclickError


@click.command()
@click.argument("data", nargs=-1, required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (best on validation); OUTPUT.last.pt holds the resumable state.")
@click.option("--task", type=click.Choice(["nuclei", "gland", "detect"]), default="nuclei", show_default=True,
              help="detect: the proposal detector (centre heatmaps from nucleus points; README: Proposals).")
@click.option("--arch", type=click.Choice(["s2d-unet", "light-unet", "nuclick"]), default=None,
              help="Default: s2d-unet (nuclei), light-unet (gland).")
@click.option("--widths", default="16,32,64,128", show_default=True, help="s2d-unet / light-unet encoder widths.")
@click.option("--loss", type=click.Choice(["calibrated", "border", "nuclick"]), default=None,
              help="calibrated (default for nuclei): Dice + BCE weighted 1 everywhere and 3 on other nuclei; "
                   "border: calibrated plus weight 3 on the background within 3 px of the clicked nucleus; "
                   "nuclick (default for glands): the paper's a^2 weight map.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 only where measured faster (as segment chooses).")
@click.option("--sampler", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where nucleus batches are made: auto = on the GPU when training on CUDA (cutting, rotating and "
                   "augmenting there; the CPU loop cannot feed a GPU), else on the CPU.")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--samples-per-epoch", type=click.IntRange(min=1), default=None,
              help="Default: one per clickable object.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 64 (nuclei), 16 (gland).")
@click.option("--patch-size", type=click.IntRange(min=16), default=None, help="Default: 128 (nuclei), 512 (gland).")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.25, show_default=True,
              help="um/px the model works at (the training images' resolution); --task detect: um/px of images "
                   "whose files do not say (the detector works at 0.5).")
@click.option("--val", "val_tiles", default="",
              help="Comma-separated image names held out for validation; 'none' trains on every image and keeps "
                   "the newest epoch (default: the last outlined image).")
@click.option("--init", default=None,
              help="Warm start: 'default' (the embedded model) or a checkpoint; its architecture is kept.")
@click.option("--exclude", default="", help="Comma-separated image names never used (your test tiles).")
@click.option("--no-binary-masks", is_flag=True, help="Ignore binary-mask-only images.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget: the learning-rate schedule anneals to end on time.")
@click.option("--slide", "slides", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Learning from corrections: a whole slide, read by region (repeat; one --annotations each).")
@click.option("--annotations", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="QuPath GeoJSON of the outlines you fixed on the --slide of the same position.")
@click.option("--roi", "rois", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Areas (polygons) to learn in, one per --slide in order (default: around the outlines).")
@click.option("--slide-mpp", type=float, default=None, callback=check_mpp,
              help="Level-0 um/px of the --slide files; overrides the files' value.")
@device_option()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@fail_cleanly
def train(data, output, task, arch, widths, epochs, samples_per_epoch, batch_size, patch_size, lr, mpp, val_tiles,
          exclude, no_binary_masks, max_minutes, device, seed, quiet, loss=None, precision="auto", init=None,
          slides=(), annotations=(), rois=(), slide_mpp=None, sampler="auto") -> None:
    """Train a NuClick model on DATA folders (MoNuSeg layout, label images, GeoJSON outlines).

    --task gland: instance label images, one id per gland (GlaS: NAME.bmp + NAME_anno.bmp); squiggles
    are sampled from each gland (README: Glands).

    Learning from corrections: --slide S.svs --annotations fixed.geojson [--roi areas.geojson] --init default
    (README: Learning from corrections); DATA folders may be added.
    """
    from nuclick_wsi.training.train import TrainConfig, train as run_train

    if not data and not slides:
        raise NuclickError("give DATA folders or --slide/--annotations pairs to train on")
    if len(slides) != len(annotations) or (rois and len(rois) != len(slides)):
        raise NuclickError(f"--slide ({len(slides)}), --annotations ({len(annotations)}) and --roi ({len(rois)}) "
                           "must pair up (one --annotations, and one --roi or none at all, per --slide)")
    pairs = [{"slide": str(s), "annotations": str(a), "roi": str(rois[k]) if rois else None, "mpp": slide_mpp}
             for k, (s, a) in enumerate(zip(slides, annotations))]
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    if task == "detect":
        if sampler == "device":
            raise NuclickError("--sampler device makes NuClick batches; --task detect has its own sampler")
        if slides:
            raise NuclickError("--task detect learns from DATA folders (images with outlines or QuPath click files); "
                               "--slide/--annotations pairs train the NuClick model")
        return _train_detector(data, output, arch, loss, widths=[int(w) for w in split(widths)], epochs=epochs,
                               samples_per_epoch=samples_per_epoch, batch_size=batch_size, patch_size=patch_size,
                               lr=lr, image_mpp=mpp, device=device, seed=seed, val=split(val_tiles),
                               exclude=split(exclude), max_minutes=max_minutes, use_binary_masks=not no_binary_masks,
                               precision=precision, init=init, progress=not quiet, log=log)
    cfg = TrainConfig(data=[str(d) for d in data], output=str(output), task=task, arch=arch,
                      widths=[int(w) for w in split(widths)], epochs=epochs, samples_per_epoch=samples_per_epoch,
                      batch_size=batch_size, patch_size=patch_size, lr=lr, mpp=mpp, device=device, seed=seed,
                      val=split(val_tiles),
                      exclude=split(exclude), max_minutes=max_minutes, use_binary_masks=not no_binary_masks,
                      loss=loss, precision=precision, init=init, slides=pairs, sampler=sampler)
    result = run_train(cfg, progress=not quiet, log=log)
    best = result["best_val_iou"]
    click.echo(f"best validation IoU {best:.4f}; weights in {output}" if best >= 0 else f"weights in {output}")


def _train_detector(data, output, arch, loss, *, progress: bool, log, **opts) -> None:
    """``--task detect``: the proposal detector's loop (training/detect.py); unset options keep its defaults."""
    from nuclick_wsi.errors import NuclickError
    from nuclick_wsi.training.detect import DetectConfig, train_detector

    if arch or loss:
        raise NuclickError("--arch and --loss are NuClick options; --task detect trains the s2d-detector")
    cfg = DetectConfig(data=[str(d) for d in data], output=str(output),
                       **{k: v for k, v in opts.items() if v is not None})
    result = train_detector(cfg, progress=progress, log=log)
    best = result["best_val_f1"]
    click.echo(f"best validation F1 {best:.4f}; weights in {output}" if best >= 0 else f"weights in {output}")
