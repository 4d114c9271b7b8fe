"""The NuClick training loop: sampling, loss, validation, checkpoints, resume."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nuclick_wsi import __version__
from nuclick_wsi.model.predictor import resolve_device
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.precision import choose_precision, for_training, grad_scaler
from nuclick_wsi.model.weights import PATCH_DEFAULTS, POSTPROCESS_DEFAULTS, build_network, save_checkpoint
from nuclick_wsi.io.datasets import Tile, load_tile, pairs_except
from nuclick_wsi.training.loss import LOSSES, nuclick_loss
from nuclick_wsi.training.sampling import PatchSampler, make_batch


SAMPLERS = ("auto", "cpu", "device")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint)."""

    data: list[str]
    output: str
    arch: str | None = None  #: default: s2d-unet (nuclei), light-unet (gland)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    epochs: int = 40
    samples_per_epoch: int | None = None  #: default: one per clickable object
    batch_size: int | None = None  #: default: 64 (nuclei), 16 (gland)
    lr: float = 3e-3
    weight_decay: float = 5e-5
    mpp: float = 0.25
    patch_size: int | None = None  #: default: PATCH_DEFAULTS[task] (nuclei 128, gland 512)
    device: str = "auto"
    seed: int = 0
    val: list[str] = field(default_factory=list)  #: tile names held for validation
    exclude: list[str] = field(default_factory=list)  #: tile names never used (test tiles)
    max_minutes: float | None = None
    use_binary_masks: bool = True
    task: str = "nuclei"
    #: "calibrated" (no size-dependent weight; default for nuclei) or "nuclick" (the paper's weight map; default for
    #: glands, whose recipe was not re-studied)
    loss: str | None = None
    precision: str = "auto"  #: "auto" (measured, as segment does), "fp32" or "bf16"
    #: warm start: "default" (the embedded model) or a checkpoint path; its architecture, widths and
    #: post-processing are kept
    init: str | None = None
    #: where nucleus batches are made: "auto" (on the GPU when training on CUDA, else on the CPU), "cpu" (NumPy,
    #: training/sampling.py) or "device" (tensors on the training device, training/device_sampler.py)
    sampler: str = "auto"
    #: slides with corrected outlines, read by region: dicts with ``slide``, ``annotations`` and optional ``roi``
    #: (areas) and ``mpp`` (level-0 um/px when the file lacks it); see training/regions.py
    slides: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in PATCH_DEFAULTS:
            raise NuclickError(f"unknown task {self.task!r} (choose from {', '.join(PATCH_DEFAULTS)})")
        if self.patch_size is None:
            self.patch_size = PATCH_DEFAULTS[self.task]
        if self.batch_size is None:
            self.batch_size = 16 if self.task == "gland" else 64
        if self.arch is None:
            self.arch = "light-unet" if self.task == "gland" else "s2d-unet"
        if self.loss is None:
            self.loss = "nuclick" if self.task == "gland" else "calibrated"
        if self.loss not in LOSSES:
            raise NuclickError(f"unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.sampler not in SAMPLERS:
            raise NuclickError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.sampler == "device" and self.task != "nuclei":
            raise NuclickError(f"--sampler device makes nucleus batches; --task {self.task} has no device sampler")


def load_tiles(data: list[str], *, exclude: list[str] = (), use_binary: bool = True, log=print) -> list[Tile]:
    """Load every image/annotation pair of the given dataset folders (outlines preferred over masks)."""
    tiles = []
    for img, ann, kind in pairs_except(data, exclude):
        if kind == "binary" and not use_binary:
            continue
        tile = load_tile(img, ann, kind=kind)
        tile.source = f"{ann} ({kind})"
        tiles.append(tile)
    if not tiles:
        raise NuclickError(f"no training tiles found in {', '.join(data)}")
    log(f"loaded {len(tiles)} tiles, {sum(len(t.targets) for t in tiles)} clickable objects")
    return tiles


VAL_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def validate(net, sampler: PatchSampler, device, batch_size: int,
             thresholds: tuple[float, ...] = VAL_THRESHOLDS, dtype: torch.dtype | None = torch.bfloat16,
             loss_kind: str = "nuclick") -> dict[str, Any]:
    """Loss and mean IoU of the object containing the click (clicks at centroids, no augmentation).

    The mask is made exactly as ``segment`` makes it (threshold, 4-connected component holding the
    click) at each of ``thresholds``; ``iou`` is the best of them and ``threshold`` where it was
    reached. The weighted BCE biases the sigmoid upwards at nucleus boundaries, so 0.5 is rarely
    the best cut and judging checkpoints at 0.5 alone picks the wrong ones.
    """
    from nuclick_wsi.postprocess.threshold import PostParams, instance_from_probability

    net.eval()
    losses = []
    ious: dict[float, list[float]] = {t: [] for t in thresholds}
    items = sampler.index
    rng = np.random.default_rng(0)
    for s in range(0, len(items), batch_size):
        x, g, go = make_batch(sampler, 0, augment=False, click_at_centroid=True, items=items[s:s + batch_size], rng=rng)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)
        losses.append(float(nuclick_loss(logits.float().cpu(), g, go, loss_kind)) * len(x))
        prob = torch.sigmoid(logits.float()).cpu().numpy()[:, 0]
        gt = g.numpy()[:, 0] > 0
        p = prob.shape[-1] // 2
        for k in range(len(prob)):
            for t in thresholds:
                crop, where = instance_from_probability(prob[k], (p, p), PostParams(t, 0, 0))
                m = np.zeros_like(gt[k])
                if crop is not None:
                    r0, c0 = where
                    m[r0:r0 + crop.shape[0], c0:c0 + crop.shape[1]] = crop
                union = (m | gt[k]).sum()
                ious[t].append((m & gt[k]).sum() / union if union else 1.0)
    net.train()
    mean = {t: float(np.mean(v)) if v else 0.0 for t, v in ious.items()}
    best_t = max(mean, key=lambda t: (mean[t], -abs(t - 0.5)))
    return {"loss": float(np.sum(losses) / max(len(items), 1)), "iou": mean[best_t], "threshold": best_t,
            "iou_by_threshold": {str(t): round(v, 4) for t, v in mean.items()}}


NO_VALIDATION = "none"


def _split_tiles(cfg: TrainConfig, log) -> tuple[list[Tile], list[Tile], list[Tile]]:
    """All tiles, the training ones and the validation ones (default: the last outlined tile).

    ``--val none`` trains on every tile and validates on none (the shipped model's final run, whose
    recipe and threshold were chosen on held-out tiles before).
    """
    tiles = load_tiles(cfg.data, exclude=cfg.exclude, use_binary=cfg.use_binary_masks, log=log) if cfg.data else []
    tiles += _slide_tiles(cfg, log)
    if cfg.val == [NO_VALIDATION]:
        return tiles, tiles, []
    val_tiles = [t for t in tiles if t.name in cfg.val]
    train_tiles = [t for t in tiles if t.name not in cfg.val]
    missing = set(cfg.val) - {t.name for t in val_tiles}
    if missing:
        raise NuclickError(f"validation tiles not found: {', '.join(sorted(missing))}")
    if not val_tiles:  # hold out the last outlined tile
        outlined = [t for t in train_tiles if "binary" not in t.source]
        val_tiles = [(outlined or train_tiles)[-1]]
        train_tiles = [t for t in train_tiles if t is not val_tiles[0]]
    check_training_left(train_tiles, [t.name for t in val_tiles], bool(cfg.val))
    return tiles, train_tiles, val_tiles


def check_training_left(train_items: list, val_names: list[str], val_given: bool) -> None:
    """Raise NuclickError when validation took every image (``--val`` naming all, or a single image)."""
    if not train_items:
        raise NuclickError(f"{'--val holds out every image' if val_given else 'the only image is held out for validation'}"
                           f" ({', '.join(val_names)}): nothing left to train on; "
                           "add images, or pass --val none to train on all")


def _slide_tiles(cfg: TrainConfig, log) -> list[Tile]:
    """Tiles of ``cfg.slides`` (whole slides + corrected outlines), read by region at the model's um/px."""
    from nuclick_wsi.training.regions import slide_tiles

    if cfg.task != "nuclei" and cfg.slides:
        raise NuclickError("--slide/--annotations train the nucleus model (--task nuclei) only")
    return [t for item in cfg.slides
            for t in slide_tiles(item["slide"], item["annotations"], mpp=cfg.mpp, patch=cfg.patch_size,
                                 roi=item.get("roi"), slide_mpp=item.get("mpp"), log=log)]


def _samplers(cfg: TrainConfig, train_tiles: list[Tile], val_tiles: list[Tile], device: torch.device):
    """(sampler, validation sampler, batch function, validation function) of the task.

    Validation always draws on the CPU sampler (clicks at centroids, no augmentation), so a checkpoint
    is judged the same whichever sampler trained it.
    """
    if cfg.task == "gland":  # squiggles, 512 x 512 patches: training/squiggles.py
        from nuclick_wsi.training.squiggles import GlandSampler, make_gland_batch, validate_glands

        return (GlandSampler(train_tiles, patch=cfg.patch_size, seed=cfg.seed),
                GlandSampler(val_tiles, patch=cfg.patch_size, seed=cfg.seed + 1) if val_tiles else None,
                make_gland_batch, validate_glands)
    val = PatchSampler(val_tiles, patch=cfg.patch_size, seed=cfg.seed + 1) if val_tiles else None
    if sampler_kind(cfg, device) == "device":
        from nuclick_wsi.training.device_sampler import DevicePatchSampler

        return (DevicePatchSampler(train_tiles, patch=cfg.patch_size, seed=cfg.seed, device=device), val,
                lambda s, n: s.batch(n), validate)
    return PatchSampler(train_tiles, patch=cfg.patch_size, seed=cfg.seed), val, make_batch, validate


def sampler_kind(cfg: TrainConfig, device: torch.device) -> str:
    """"device" or "cpu": where ``cfg`` has its nucleus batches made when training on ``device``.

    ``auto`` picks the device sampler on CUDA, where the NumPy loop and not the network limits the
    pace; on a CPU the NumPy sampler is the faster (measured in the module docstring of device_sampler).
    """
    if cfg.sampler != "auto":
        return cfg.sampler
    return "device" if device.type == "cuda" and cfg.task == "nuclei" else "cpu"


def _rng_state(sampler):
    """The sampler's random state: a NumPy bit-generator state, or a device generator's state tensor."""
    gen = getattr(sampler, "gen", None)
    return gen.get_state() if gen is not None else sampler.rng.bit_generator.state


def _set_rng_state(sampler, state, source: Path) -> None:
    gen = getattr(sampler, "gen", None)
    if (gen is not None) != isinstance(state, torch.Tensor):
        was = "device" if isinstance(state, torch.Tensor) else "cpu"
        raise NuclickError(f"{source}: this run was trained with the {was} sampler; resume it with --sampler {was}")
    if gen is not None:
        try:
            gen.set_state(state)
        except RuntimeError:  # a CUDA generator's state (16 bytes) does not fit a CPU one (5056) and vice versa
            raise NuclickError(f"{source}: its device sampler ran on another kind of device than {gen.device.type}; "
                               "resume it there") from None
    else:
        sampler.rng.bit_generator.state = state


def _network(cfg: TrainConfig, log) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(network, arch args, post-processing) built fresh, or warm-started from ``cfg.init``."""
    if cfg.init is None:
        arch_args = {"widths": list(cfg.widths)} if cfg.arch in ("light-unet", "s2d-unet") else {}
        return build_network(cfg.arch, arch_args), arch_args, dict(POSTPROCESS_DEFAULTS[cfg.task])
    from nuclick_wsi.model.weights import load_model

    loaded = load_model(None if cfg.init == "default" else cfg.init, task=cfg.task)
    if loaded.task != cfg.task:
        raise NuclickError(f"--init {cfg.init}: a {loaded.task} model cannot start a {cfg.task} training run")
    cfg.arch, cfg.patch_size, cfg.mpp = loaded.arch, loaded.patch_size, loaded.mpp
    if "widths" in loaded.arch_args:
        cfg.widths = list(loaded.arch_args["widths"])
    log(f"warm start from {loaded.source or cfg.init}: {loaded.arch} {loaded.arch_args}")
    return loaded.net, dict(loaded.arch_args), loaded.postprocess


def resume_state(last: Path, net: torch.nn.Module, opt, sampler, log) -> tuple[int, float, list, float, int]:
    """(start epoch, best IoU, history, elapsed s, global step) from ``last``, or a fresh start."""
    if not last.exists():
        return 0, -1.0, [], 0.0, 0
    try:
        ck = torch.load(last, map_location="cpu", weights_only=False)
        state, opt_state = ck["state_dict"], ck["optimizer"]
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or not a checkpoint at all
        raise NuclickError(f"{last}: not a resumable training state ({type(exc).__name__}); "
                           "remove it to start afresh") from None
    try:
        net.load_state_dict(state)
        opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError):  # other --arch/--widths/--task than the run that wrote it
        raise NuclickError(f"{last}: saved by a run of another network ({ck.get('arch')}, "
                           f"{ck.get('arch_args')}); resume with that run's --arch/--widths/--task, "
                           "or remove it (or choose another -o) to start afresh") from None
    _set_rng_state(sampler, ck["rng"], last)
    torch.set_rng_state(ck["torch_rng"])
    log(f"resumed from {last} at epoch {ck['epoch']}")
    return ck["epoch"], ck["best"], ck["history"], ck.get("elapsed_s", 0.0), ck["step"]


def save_state(last: Path, net: torch.nn.Module, arch: str, arch_args: dict[str, Any], meta: dict[str, Any], opt,
               sampler, *, step: int, epoch: int, best: float, history: list, elapsed: float) -> None:
    """Write the resumable state that :func:`resume_state` reads back."""
    save_checkpoint(last, net, arch, arch_args, meta, extra={
        "optimizer": opt.state_dict(), "step": step, "epoch": epoch, "best": best, "history": history,
        "rng": _rng_state(sampler), "torch_rng": torch.get_rng_state(), "elapsed_s": elapsed})


def _base_metadata(cfg: TrainConfig, tiles, train_tiles, val_tiles, sampler, val_sampler, choice,
                   device: torch.device, post: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": cfg.task, "mpp": cfg.mpp, "patch_size": cfg.patch_size,
        "postprocess": dict(post),
        "input": "RGB in [0, 1], inclusion map, exclusion map",
        "training": {
            "config": asdict(cfg),
            "train_tiles": [t.name for t in train_tiles], "val_tiles": [t.name for t in val_tiles],
            "sampler": sampler_kind(cfg, device) if cfg.task == "nuclei" else "cpu",
            "train_objects": len(sampler), "val_objects": len(val_sampler) if val_sampler else 0,
            "sources": sorted({t.source for t in tiles}),
        },
        "package_version": __version__, "training_precision": {"name": choice.name, "reason": choice.reason},
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}",
        "command": " ".join(sys.argv),
    }


def lr_schedule(cfg: TrainConfig, opt, total: int):
    """set_lr(step, elapsed): warm-up, then cosine to 2 % by steps, or by time under --max-minutes."""
    warm = min(200, total // 20 + 1)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None

    def set_lr(step: int, elapsed: float) -> None:
        p = step / total
        p = min(max(p, elapsed / budget_s) if budget_s else p, 1.0)
        factor = min(1.0, (step + 1) / warm) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor

    return set_lr


def optimise(net, opt, next_batch, steps: int, device, dtype, set_lr, gstep: int, clock, bar) -> tuple[float, int]:
    """``steps`` optimiser steps; returns the summed loss and the global step after them.

    ``next_batch()`` gives (inputs, loss function of the logits); the forward pass runs under autocast
    at ``dtype`` (None: fp32), the loss outside it; fp16 scales the loss (:func:`grad_scaler`). Shared by
    the NuClick and the detector loops.
    """
    run_loss = 0.0
    scaler = grad_scaler(device, dtype)
    for step in range(steps):
        x, loss_of = next_batch()
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)
        loss = loss_of(logits)
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        set_lr(gstep, clock())
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        gstep += 1
        run_loss += loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / (step + 1):.4f}")
    return run_loss, gstep


def _train_epoch(net, opt, sampler, batch_fn, cfg: TrainConfig, device, dtype, steps: int, set_lr, gstep: int,
                 clock, bar) -> tuple[float, int]:
    """One epoch of ``steps`` NuClick batches."""
    def next_batch():
        x, g, go = batch_fn(sampler, cfg.batch_size)
        return x, lambda logits: nuclick_loss(logits, g.to(device), go.to(device), cfg.loss)

    return optimise(net, opt, next_batch, steps, device, dtype, set_lr, gstep, clock, bar)


def train(cfg: TrainConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Train a NuClick model; resume from ``<output>.last.pt`` when it exists. Returns final metrics."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    last = out.with_name(out.stem + ".last.pt")
    net, arch_args, post0 = _network(cfg, log)
    net = net.to(device).to(memory_format=torch.channels_last)
    tiles, train_tiles, val_tiles = _split_tiles(cfg, log)
    sampler, val_sampler, batch_fn, val_fn = _samplers(cfg, train_tiles, val_tiles, device)
    if cfg.task == "nuclei":
        log(f"sampler: {sampler_kind(cfg, device)}")
    choice = for_training(choose_precision(net, device, cfg.precision, patch_size=cfg.patch_size,
                                           arch_key=(cfg.arch, arch_args)), device)
    dtype = choice.dtype
    log(f"precision: {choice.name} ({choice.reason})")
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max((cfg.samples_per_epoch or len(sampler)) // cfg.batch_size, 1)
    set_lr = lr_schedule(cfg, opt, steps_per_epoch * cfg.epochs)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    start_epoch, best, history, elapsed0, gstep = resume_state(last, net, opt, sampler, log)
    meta_base = _base_metadata(cfg, tiles, train_tiles, val_tiles, sampler, val_sampler, choice, device,
                               post0)
    t0 = time.time()
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        run_loss, gstep = _train_epoch(net, opt, sampler, batch_fn, cfg, device, dtype, steps_per_epoch, set_lr,
                                       gstep, lambda: elapsed0 + time.time() - t0, bar)
        if bar is not None:
            bar.close()
        vm = {} if val_sampler is None else val_fn(  # --val none: no figure but the training loss
            net, val_sampler, device, cfg.batch_size,
            **({"dtype": dtype, "loss_kind": cfg.loss} if val_fn is validate else {}))
        elapsed = elapsed0 + time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch, **{f"val_{k}": v for k, v in vm.items()},
                        "elapsed_s": round(elapsed, 1)})
        at = f" at {vm['threshold']:g}" if "threshold" in vm else ""
        shown = f"  val loss {vm['loss']:.4f}  val IoU {vm['iou']:.4f}{at}" if vm else ""
        log(f"epoch {epoch + 1}: train loss {run_loss / steps_per_epoch:.4f}{shown}  ({elapsed / 60:.1f} min)")
        post = dict(meta_base["postprocess"])
        if "threshold" in vm:  # the cut validated with this checkpoint
            post["threshold"] = vm["threshold"]
        meta = dict(meta_base, postprocess=post, validation=dict(vm, epoch=epoch + 1) if vm else None,
                    training=dict(meta_base["training"], epochs_done=epoch + 1, elapsed_s=round(elapsed, 1), history=history))
        if not vm or vm["iou"] > best:  # without validation the newest epoch is the model
            best = vm.get("iou", best)
            save_checkpoint(out, net, cfg.arch, arch_args, meta)
        save_state(last, net, cfg.arch, arch_args, meta, opt, sampler, step=gstep, epoch=epoch + 1, best=best,
                   history=history, elapsed=elapsed)
        if budget_s and elapsed >= budget_s:
            log(f"stopping after {elapsed / 60:.1f} min (--max-minutes)")
            break
    return {"best_val_iou": best, "history": history, "output": str(out)}
