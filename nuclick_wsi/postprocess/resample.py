"""A probability patch back onto level-0 pixels."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def to_level0(prob: np.ndarray, x0: float, y0: float, size: float, step: float) -> tuple[np.ndarray, int, int]:
    """Resample a square probability patch covering level-0 ``[x0, x0 + size)`` (and likewise in y).

    ``step`` is level-0 pixels per patch pixel. Returns the probability on the level-0 pixel grid
    (bilinear; the patch as it is when it already lies on that grid) and the level-0 pixel of its
    corner. Patch pixel ``(i, j)`` is centred on level-0 point ``(x0 + (j + 0.5) * step, y0 + (i + 0.5) * step)``.
    """
    if step == 1.0 and float(x0).is_integer() and float(y0).is_integer():
        return prob, int(x0), int(y0)
    u0, v0 = math.floor(x0), math.floor(y0)
    w, h = math.ceil(x0 + size) - u0, math.ceil(y0 + size) - v0
    off = [(v0 + 0.5 - y0) / step - 0.5, (u0 + 0.5 - x0) / step - 0.5]
    grid = ndi.affine_transform(prob, [1 / step, 1 / step], offset=off, output_shape=(h, w), order=1, mode="nearest")
    return grid, u0, v0
