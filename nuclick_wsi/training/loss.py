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


def border_weights(target: torch.Tensor, others: torch.Tensor, other_weight: float = 2.0, ring_weight: float = 2.0,
                   ring_px: int = 3) -> torch.Tensor:
    """:func:`calibrated_weights` plus ``ring_weight`` on the background within ``ring_px`` of the clicked nucleus.

    A boundary-aware term after Mercadier et al. (2019), who weight the background between touching
    nuclei: the pixels an outline spills into when it comes out too big weigh more, whatever the size.
    """
    k = 2 * ring_px + 1
    ring = F.max_pool2d(target, k, stride=1, padding=ring_px) - target
    return calibrated_weights(target, others, other_weight) + ring_weight * ring * (1 - others)


WEIGHTS = {"nuclick": nuclick_weights, "calibrated": calibrated_weights, "border": border_weights}
LOSSES = tuple(WEIGHTS)


def nuclick_loss(logits: torch.Tensor, target: torch.Tensor, others: torch.Tensor, kind: str = "nuclick") -> torch.Tensor:
    """Soft Dice plus weighted BCE (mean of W * BCE over pixels); ``kind`` picks the weight map."""
    logits = logits.float()
    w = WEIGHTS[kind](target, others)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=w, reduction="mean")
    return soft_dice_loss(torch.sigmoid(logits), target) + bce
