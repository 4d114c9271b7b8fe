"""Post-processing of one probability patch into one instance mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

_FOUR = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class PostParams:
    """Thresholds, in pixels of the grid the probabilities are on."""

    threshold: float = 0.5
    min_object_px: float = 10
    min_hole_px: float = 30

    def scaled(self, area_factor: float) -> "PostParams":
        """The same rule on a grid whose pixels are ``1 / area_factor`` as large."""
        return PostParams(self.threshold, self.min_object_px * area_factor, self.min_hole_px * area_factor)


def instance_from_probability(prob: np.ndarray, seed: np.ndarray | tuple[int, int], params: PostParams
                              ) -> tuple[np.ndarray | None, str]:
    """Threshold, keep the component containing the seed, fill small holes.

    Parameters
    ----------
    prob : (H, W) float array
    seed : (row, col) of the click, or a boolean (H, W) array (a squiggle)
    params : PostParams

    Returns
    -------
    mask, reason
        The boolean instance mask (4-connected, containing the seed), or None and why not.
    """
    fg = prob >= params.threshold
    if isinstance(seed, tuple):
        r, c = seed
        if not fg[r, c]:
            return None, f"nothing segmented: probability {prob[r, c]:.3f} at the click is below {params.threshold:g}"
        seed_mask = None
    else:
        seed_mask = seed & fg
        if not seed_mask.any():
            return None, f"nothing segmented: probability along the squiggle is below {params.threshold:g}"
    lab, _ = ndi.label(fg, structure=_FOUR)
    if seed_mask is None:
        mask = lab == lab[r, c]
    else:
        mask = np.isin(lab, np.unique(lab[seed_mask]))
    area = int(mask.sum())
    if area < params.min_object_px:
        return None, f"nothing segmented: object of {area} px is smaller than {params.min_object_px:g} px"
    if params.min_hole_px > 0:
        holes = ndi.binary_fill_holes(mask) & ~mask
        if holes.any():
            hl, n = ndi.label(holes, structure=_FOUR)
            sizes = np.bincount(hl.ravel(), minlength=n + 1)
            small = sizes < params.min_hole_px
            small[0] = False
            mask |= small[hl]
    return mask, ""
