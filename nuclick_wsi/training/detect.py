"""``train --task detect``: the proposal detector's training loop (centre heatmaps from points).

Same machinery as the NuClick loop (training/train.py): Adam, warm-up then cosine learning rate
(annealed to end on time under ``--max-minutes``), precision measured, the best checkpoint on
validation plus ``OUTPUT.last.pt`` to resume, ``--init`` to warm start. The loss is CenterNet's
penalty-reduced focal loss on a Gaussian per point; unlabelled areas (an item's ``valid`` mask)
weigh nothing. Validation runs the detector on whole validation images and picks the peak threshold
with the best F1 (proposal inside the true nucleus when outlines are known, else within 3 um of a
true point); that threshold ships in the checkpoint.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from nuclick_wsi import __version__
from nuclick_wsi.detection.peaks import f1_counts, match_distance, match_inside
from nuclick_wsi.detection.predict import MIN_DISTANCE_UM, detect_image
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.precision import choose_precision, for_training
from nuclick_wsi.model.predictor import resolve_device
from nuclick_wsi.model.weights import build_network, save_checkpoint
from nuclick_wsi.training.detect_data import DetectionItem, DetectionSampler, load_detection_items
from nuclick_wsi.training.train import (NO_VALIDATION, check_training_left, lr_schedule, optimise, resume_state,
                                        save_state)

ARCH = "s2d-detector"
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
MATCH_RADIUS_UM = 3.0


@dataclass
class DetectConfig:
    """A detector training run (saved in the checkpoint)."""

    data: list[str]
    output: str
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    epochs: int = 40
    samples_per_epoch: int = 512
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 5e-5
    mpp: float = 0.5  #: um/px the detector works at
    image_mpp: float = 0.25  #: um/px of images whose files do not say
    patch_size: int = 256
    sigma_um: float = 1.5  #: Gaussian of each centre in the target
    device: str = "auto"
    seed: int = 0
    val: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    max_minutes: float | None = None
    use_binary_masks: bool = True
    precision: str = "auto"
    init: str | None = None  #: "default" (the embedded detector) or a checkpoint
    task: str = "detect"

    def __post_init__(self) -> None:
        side = 2 ** len(self.widths)  # the 2x2 fold, then len(widths) - 1 poolings
        if self.patch_size % side:
            raise NuclickError(f"--patch-size {self.patch_size}: the detector needs a multiple of {side}")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), per point, zero where ``weight`` is 0."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    pos = (target >= 1.0).float() * weight
    neg = (1.0 - (target >= 1.0).float()) * weight
    pos_term = -F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_term = -F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * neg
    return (pos_term.sum() + neg_term.sum()) / pos.sum().clamp(min=1.0)


def score_item(item: DetectionItem, xy: np.ndarray) -> dict[str, float]:
    """Counts of the proposals ``xy`` (item pixels) against the item's nuclei, inside its valid area."""
    if item.valid is not None:
        h, w = item.valid.shape
        r = np.clip(np.floor(xy[:, 1]).astype(int), 0, h - 1)
        c = np.clip(np.floor(xy[:, 0]).astype(int), 0, w - 1)
        xy = xy[item.valid[r, c]]
    if item.labels is not None:
        return match_inside(xy, item.labels)
    return match_distance(xy, item.points, MATCH_RADIUS_UM / item.mpp)


def validate_detector(net, items: list[DetectionItem], mpp: float, device, dtype=None,
                      thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """F1 over all validation items (summed counts) at each threshold; the best one and its threshold."""
    net.eval()
    tp = {t: 0 for t in thresholds}
    n_pred = {t: 0 for t in thresholds}
    n_true = 0
    for item in items:
        found = detect_image(net, item.image, image_mpp=item.mpp, model_mpp=mpp, thresholds=thresholds,
                             device=device, dtype=dtype)
        for t, (xy, _) in found.items():
            s = score_item(item, xy)
            tp[t] += s["tp"]
            n_pred[t] += s["tp"] + s["fp"]
        n_true += s["tp"] + s["fn"]
    net.train()
    scores = {t: f1_counts(tp[t], n_pred[t], n_true) for t in thresholds}
    best = max(thresholds, key=lambda t: (scores[t]["f1"], -abs(t - 0.4)))
    return {"f1": scores[best]["f1"], "precision": scores[best]["precision"], "recall": scores[best]["recall"],
            "threshold": best, "f1_by_threshold": {str(t): round(s["f1"], 4) for t, s in scores.items()}}


def detector_network(cfg: DetectConfig, log) -> tuple[torch.nn.Module, dict[str, Any], dict[str, float]]:
    """(network, arch args, post-processing): fresh, or warm-started from ``cfg.init``."""
    if cfg.init is None:
        arch_args = {"widths": list(cfg.widths)}
        net = build_network(ARCH, arch_args)
        torch.nn.init.constant_(net.head.bias, -2.19)  # prior 0.1: CenterNet's start
        return net, arch_args, {"threshold": 0.4, "min_distance_um": MIN_DISTANCE_UM}
    from nuclick_wsi.model.weights import load_model

    loaded = load_model(None if cfg.init == "default" else cfg.init, task="detect")
    if loaded.task != "detect":
        raise NuclickError(f"--init {cfg.init}: a {loaded.task} model cannot start a detector training run")
    cfg.mpp, cfg.widths = loaded.mpp, list(loaded.arch_args.get("widths", cfg.widths))
    log(f"warm start from {loaded.source or cfg.init}: {loaded.arch} {loaded.arch_args}")
    return loaded.net, dict(loaded.arch_args), dict(loaded.postprocess)


def split_items(cfg: DetectConfig, log) -> tuple[list[DetectionItem], list[DetectionItem]]:
    """(training items, validation items) from ``cfg.data``; default validation: the last outlined image."""
    items = load_detection_items(cfg.data, exclude=cfg.exclude, use_binary=cfg.use_binary_masks,
                                 mpp=cfg.image_mpp, log=log)
    if cfg.val == [NO_VALIDATION]:
        return items, []
    val = [i for i in items if i.name in cfg.val]
    missing = set(cfg.val) - {i.name for i in val}
    if missing:
        raise NuclickError(f"validation images not found: {', '.join(sorted(missing))}")
    if not val:
        val = [([i for i in items if i.valid is None] or items)[-1]]
    train = [i for i in items if all(i is not v for v in val)]
    check_training_left(train, [i.name for i in val], bool(cfg.val))
    return train, val


def train_detector(cfg: DetectConfig, items: list[DetectionItem] | None = None,
                   val_items: list[DetectionItem] | None = None, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Train (or fine-tune) the detector; items default to ``cfg.data``'s. Resumes from ``OUTPUT.last.pt``."""
    from pathlib import Path

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    last = out.with_name(out.stem + ".last.pt")
    net, arch_args, post = detector_network(cfg, log)
    net = net.to(device).to(memory_format=torch.channels_last)
    if items is None:
        items, val_items = split_items(cfg, log)
    val_items = val_items or []
    sampler = DetectionSampler(items, mpp=cfg.mpp, patch=cfg.patch_size, sigma_um=cfg.sigma_um, seed=cfg.seed)
    choice = for_training(choose_precision(net, device, cfg.precision, patch_size=cfg.patch_size,
                                           arch_key=(ARCH, arch_args), in_channels=3), device)
    log(f"precision: {choice.name} ({choice.reason})")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(cfg.samples_per_epoch // cfg.batch_size, 1)
    set_lr = lr_schedule(cfg, opt, steps * cfg.epochs)
    start, best, history, elapsed0, gstep = resume_state(last, net, opt, sampler, log)
    meta_base = {"task": "detect", "mpp": cfg.mpp, "patch_size": cfg.patch_size, "postprocess": post,
                 "input": "RGB in [0, 1]; output: centre heatmap at 1/2 resolution",
                 "training": {"config": asdict(cfg), "train_images": [i.name for i in items],
                              "val_images": [i.name for i in val_items], "train_points": len(sampler)},
                 "package_version": __version__, "training_precision": {"name": choice.name, "reason": choice.reason},
                 "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}",
                 "command": " ".join(sys.argv)}
    t0 = time.time()
    net.train()
    for epoch in range(start, cfg.epochs):
        clock = lambda: elapsed0 + time.time() - t0  # noqa: E731
        run_loss, gstep = _epoch(net, opt, sampler, cfg, device, choice.dtype, steps, set_lr, gstep, clock,
                                 progress, f"epoch {epoch + 1}/{cfg.epochs}")
        vm = validate_detector(net, val_items, cfg.mpp, device, choice.dtype) if val_items else {}
        elapsed = clock()
        history.append({"epoch": epoch + 1, "train_loss": run_loss / steps, **{f"val_{k}": v for k, v in vm.items()},
                        "elapsed_s": round(elapsed, 1)})
        shown = f"  val F1 {vm['f1']:.4f} at {vm['threshold']:g}" if vm else ""
        log(f"epoch {epoch + 1}: train loss {run_loss / steps:.4f}{shown}  ({elapsed / 60:.1f} min)")
        meta = dict(meta_base, postprocess=dict(post, **({"threshold": vm["threshold"]} if vm else {})),
                    validation=dict(vm, epoch=epoch + 1) if vm else None,
                    training=dict(meta_base["training"], epochs_done=epoch + 1, elapsed_s=round(elapsed, 1),
                                  history=history))
        if not vm or vm["f1"] > best:
            best = vm.get("f1", best)
            save_checkpoint(out, net, ARCH, arch_args, meta)
        save_state(last, net, ARCH, arch_args, meta, opt, sampler, step=gstep, epoch=epoch + 1, best=best,
                   history=history, elapsed=elapsed)
        if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
            log(f"stopping after {elapsed / 60:.1f} min (--max-minutes)")
            break
    return {"best_val_f1": best, "history": history, "output": str(out)}


def _epoch(net, opt, sampler: DetectionSampler, cfg: DetectConfig, device, dtype, steps: int, set_lr, gstep: int,
           clock, progress: bool, desc: str) -> tuple[float, int]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False, file=sys.stderr)

    def next_batch():
        x, target, weight = sampler.batch(cfg.batch_size)
        return x, lambda logits: focal_loss(logits, target.to(device), weight.to(device))

    try:
        return optimise(net, opt, next_batch, steps, device, dtype, set_lr, gstep, clock, bar)
    finally:
        if bar is not None:
            bar.close()
