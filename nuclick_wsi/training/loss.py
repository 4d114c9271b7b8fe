"""NuClick loss: soft Dice + weighted binary cross-entropy."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nuclick_weights(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Weight map W = a^2 G + a G~ + 1 with a = max(sum G~ / sum G, 1), per sample.

    Parameters
    ----------
    target, others : tensors (N, 1, H, W) of 0/1
        G, the clicked object, and G~, the other objects in the patch.
    """
    dims = tuple(range(1, target.ndim))
    a = (others.sum(dim=dims, keepdim=True) / target.sum(dim=dims, keepdim=True).clamp_min(1)).clamp_min(1)
    return a * a * target + a * others + 1


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over the batch."""
    dims = tuple(range(1, target.ndim))
    inter = (prob * target).sum(dims)
    return (1 - (2 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def calibrated_weights(target: torch.Tensor, others: torch.Tensor, other_weight: float = 2.0) -> torch.Tensor:
    """Weight map without the size-dependent factor: 1 everywhere, ``other_weight`` on other objects.

    NuClick's a^2 G term grows as the clicked nucleus shrinks, which pushes small nuclei outward
    (measured: predicted/true area 1.5 below 100 px, 1.0 above 400 px). Here every pixel of the clicked
    nucleus and of the background weighs the same whatever the nucleus' size; pixels of the *other*
    nuclei weigh a bounded constant so that an outline does not run into its neighbour.
    """
    return 1 + other_weight * others


LOSSES = ("nuclick", "calibrated")


def nuclick_loss(logits: torch.Tensor, target: torch.Tensor, others: torch.Tensor, kind: str = "nuclick") -> torch.Tensor:
    """Soft Dice plus weighted BCE (mean of W * BCE over pixels); ``kind`` picks the weight map."""
    logits = logits.float()
    w = nuclick_weights(target, others) if kind == "nuclick" else calibrated_weights(target, others)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=w, reduction="mean")
    return soft_dice_loss(torch.sigmoid(logits), target) + bce
