"""Where the tissue is: a mask from a low-resolution read of the slide.

The slide is read at ``mask_mpp`` (8 um/px by default) in blocks (from the coarsest pyramid level
that serves it, so memory stays small on any slide), and a pixel is tissue when its colour
saturation is above a cut: Otsu's on the saturation of the whole thumbnail, kept between
``SAT_RANGE`` (a slide that is all tissue must not lose its paler half; glass is grey-white).
Otsu's cut is scikit-image's; small specks are dropped and small holes filled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nuclick_wsi.io.slides.base import SlideSource

#: bounds of the saturation cut: below 0.03 is glass and scanner noise, above 0.08 pale tissue would be lost
SAT_RANGE = (0.03, 0.08)
#: tissue pieces smaller than this are dropped, holes smaller than this filled (um^2)
MIN_TISSUE_UM2 = 2000.0
MAX_HOLE_UM2 = 20000.0


@dataclass
class TissueMask:
    """A boolean mask whose pixel (i, j) covers level-0 ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``."""

    mask: np.ndarray
    downsample: float  #: level-0 pixels per mask pixel
    threshold: float  #: the saturation cut used

    def area_px0(self) -> float:
        """Tissue area in level-0 pixels."""
        return float(self.mask.sum()) * self.downsample ** 2

    def touches(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """True when the level-0 box [x0, x1) x [y0, y1) holds any tissue."""
        ds, (h, w) = self.downsample, self.mask.shape
        c0, c1 = max(int(x0 // ds), 0), min(int(math.ceil(x1 / ds)), w)
        r0, r1 = max(int(y0 // ds), 0), min(int(math.ceil(y1 / ds)), h)
        return c1 > c0 and r1 > r0 and bool(self.mask[r0:r1, c0:c1].any())


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0).astype(np.float32)


def read_thumbnail(slide: SlideSource, downsample: float, block: int = 2048) -> np.ndarray:
    """The slide at 1 / ``downsample``, read in blocks of at most ``block`` pixels of the level read."""
    w, h = math.ceil(slide.width / downsample), math.ceil(slide.height / downsample)
    level_ds = 1.0
    best = getattr(slide, "best_level", None)
    if best is not None:
        level_ds = slide.level_downsamples[best(downsample)]
    step = max(int(block * level_ds / downsample), 16)  # thumbnail pixels per block side
    out = np.empty((h, w, 3), np.uint8)
    for r in range(0, h, step):
        for c in range(0, w, step):
            bh, bw = min(step, h - r), min(step, w - c)
            out[r:r + bh, c:c + bw] = slide.read_region(c * downsample, r * downsample, bw * downsample,
                                                        bh * downsample, bw, bh)
    return out


def tissue_mask(slide: SlideSource, slide_mpp: float, mask_mpp: float = 8.0) -> TissueMask:
    """The tissue of ``slide`` (level-0 um/px ``slide_mpp``) at about ``mask_mpp``."""
    from skimage.filters import threshold_otsu

    ds = max(mask_mpp / slide_mpp, 1.0)
    sat = saturation(read_thumbnail(slide, ds))
    cut = SAT_RANGE[0]
    if sat.size > 1 and float(sat.max()) > float(sat.min()):
        cut = float(np.clip(threshold_otsu(sat), *SAT_RANGE))
    mask = sat > cut
    px_um2 = (ds * slide_mpp) ** 2
    mask = keep_large(mask, MIN_TISSUE_UM2 / px_um2)
    mask = mask | ~keep_large(~mask, MAX_HOLE_UM2 / px_um2)  # holes: small pieces of the background
    return TissueMask(mask, ds, cut)


def keep_large(mask: np.ndarray, min_px: float) -> np.ndarray:
    """The 8-connected components of ``mask`` of at least ``min_px`` pixels."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if not n:
        return mask.copy()
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False
    return keep[labels]
