"""Pixel conversion (samples -> RGB uint8, transparency on white) and resampling of regions."""

from __future__ import annotations

import numpy as np

from nuclick_wsi.errors import SlideError


BOX_FILTER_FROM = 1.5
"""Reduction factor (level pixels per output pixel) from which area averaging is used;
below it (and when enlarging) an antialiased bicubic filter is used."""


WHITE = 255


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def composite_on_white(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite an ``(..., 4)`` uint8 RGBA array over white; return RGB uint8.

    Opaque pixels (alpha 255, nearly all of a slide's) keep their samples, which is what the
    formula gives them; only the others are computed (slide reads spent most of their time here).
    """
    rgba = np.asarray(rgba)
    part = rgba[..., 3] != 255
    n = int(np.count_nonzero(part))
    if n > part.size // 4:  # mostly see-through (outside the scanned area): every pixel at once
        return _composite(rgba, premultiplied)
    out = np.array(rgba[..., :3], dtype=np.uint8, copy=True)
    if n:
        out[part] = _composite(rgba[part], premultiplied)
    return out


def _composite(rgba: np.ndarray, premultiplied: bool) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32) * (255 if premultiplied else alpha)
    return np.minimum((rgb + WHITE * (255 - alpha) + 127) // 255, 255).astype(np.uint8)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Bring uint8 / uint16 samples to uint8 (uint16 is rescaled by 1/257)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    raise SlideError(f"unsupported sample type {arr.dtype} (only 8- or 16-bit images)")


def rgb_from_samples(arr: np.ndarray, alpha: str | None = None) -> np.ndarray:
    """Make an RGB uint8 array from gray, gray+alpha, RGB or RGBA samples.

    Parameters
    ----------
    arr : ndarray
        ``(h, w)`` or ``(h, w, s)`` with ``s`` in 1..4 (more samples: the first 3 are used).
    alpha : {None, "straight", "premultiplied"}
        How to treat a last sample beyond gray/RGB; None drops it.
    """
    arr = to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        arr = arr[..., None]
    samples = arr.shape[2]
    if samples in (1, 2):
        gray = np.repeat(arr[..., :1], 3, axis=2)
        if samples == 2 and alpha:
            return composite_on_white(np.concatenate([gray, arr[..., 1:2]], axis=2),
                                       alpha == "premultiplied")
        return np.ascontiguousarray(gray)
    if samples >= 4 and alpha:
        return composite_on_white(arr[..., :4], alpha == "premultiplied")
    return np.ascontiguousarray(arr[..., :3])


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------


def pad_white(arr: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """Pad an RGB array with white on each side (no copy when nothing to pad)."""
    if left == top == right == bottom == 0:
        return arr
    return np.pad(arr, ((top, bottom), (left, right), (0, 0)), constant_values=WHITE)


def is_integral(values: tuple[float, ...]) -> bool:
    """True when all values are (within 1e-9) integers."""
    return all(abs(v - round(v)) < 1e-9 for v in values)


def resample(arr: np.ndarray, box: tuple[float, float, float, float],
              out_width: int, out_height: int) -> np.ndarray:
    """Resample ``box`` (x0, y0, x1, y1 in ``arr`` pixels) of an RGB array to the output size.

    A box of exactly the output size on whole pixels is copied; a reduction by at least
    :data:`BOX_FILTER_FROM` on both axes uses area averaging (PIL ``BOX``), anything else
    an antialiased bicubic filter. PIL takes the float box exactly and uses the pixels
    around it for the filter support.
    """
    x0, y0, x1, y1 = box
    if is_integral(box) and round(x1 - x0) == out_width and round(y1 - y0) == out_height:
        c0, r0 = round(x0), round(y0)
        return np.ascontiguousarray(arr[r0:r0 + out_height, c0:c0 + out_width])
    from PIL import Image

    reduce_x = (x1 - x0) / out_width
    reduce_y = (y1 - y0) / out_height
    if min(reduce_x, reduce_y) >= BOX_FILTER_FROM:
        resample = Image.Resampling.BOX
    else:
        resample = Image.Resampling.BICUBIC
    image = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(image.resize((out_width, out_height), resample, box=box))


def fmt_number(value: float) -> str:
    """Compact number for messages."""
    return f"{value:.6g}"

