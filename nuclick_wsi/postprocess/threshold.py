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


def fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill the holes of ``mask`` smaller than ``max_area`` pixels (in place; returns it)."""
    if max_area <= 0:
        return mask
    holes = ndi.binary_fill_holes(mask) & ~mask
    if holes.any():
        hl, n = ndi.label(holes, structure=_FOUR)
        sizes = np.bincount(hl.ravel(), minlength=n + 1)
        small = sizes < max_area
        small[0] = False
        mask |= small[hl]
    return mask


def instance_from_probability(prob: np.ndarray, seed: np.ndarray | tuple[int, int], params: PostParams
                              ) -> tuple[np.ndarray | None, tuple[int, int] | str]:
    """Threshold, keep the component containing the seed, fill small holes.

    Parameters
    ----------
    prob : (H, W) float array
    seed : (row, col) of the click, or a boolean (H, W) array (a squiggle)
    params : PostParams

    Returns
    -------
    mask, origin_or_reason
        The boolean instance mask cropped to its bounding box (4-connected, containing the seed)
        and the (row, col) of the crop's corner in ``prob``; or None and why there is no instance.
    """
    fg = prob >= params.threshold
    if isinstance(seed, tuple):
        r, c = seed
        if not fg[r, c]:
            return None, f"nothing segmented: probability {prob[r, c]:.3f} at the click is below {params.threshold:g}"
    else:
        seed = seed & fg
        if not seed.any():
            return None, f"nothing segmented: probability along the squiggle is below {params.threshold:g}"
    lab, _ = ndi.label(fg, structure=_FOUR)
    ids = [int(lab[r, c])] if isinstance(seed, tuple) else [int(i) for i in np.unique(lab[seed]) if i]
    boxes = ndi.find_objects(lab, max_label=max(ids))
    r0 = min(boxes[i - 1][0].start for i in ids)
    r1 = max(boxes[i - 1][0].stop for i in ids)
    c0 = min(boxes[i - 1][1].start for i in ids)
    c1 = max(boxes[i - 1][1].stop for i in ids)
    crop = lab[r0:r1, c0:c1]
    mask = crop == ids[0] if len(ids) == 1 else np.isin(crop, ids)
    area = int(mask.sum())
    if area < params.min_object_px:
        return None, f"nothing segmented: object of {area} px is smaller than {params.min_object_px:g} px"
    return fill_small_holes(mask, params.min_hole_px), (r0, c0)
