"""In-memory images (arrays) and Pillow-decoded files (PNG, JPEG, ...)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nuclick_wsi.io.slides.base import FileMpp, Level, PyramidSource
from nuclick_wsi.io.slides.pixels import composite_on_white, rgb_from_samples
from nuclick_wsi.io.slides.resolution import check_given_mpp, mpp_from_resolution
from nuclick_wsi.errors import SlideError


# --------------------------------------------------------------------------------------
# In-memory arrays and Pillow
# --------------------------------------------------------------------------------------


class ArraySource(PyramidSource):
    """A single-level slide held in memory as an RGB uint8 array."""

    reader = "array"

    def __init__(self, rgb: np.ndarray, path: Path | str = "array") -> None:
        rgb = rgb_from_samples(np.asarray(rgb), alpha="straight")
        h, w = rgb.shape[:2]
        if h < 1 or w < 1:
            raise SlideError(f"{path}: empty image ({w}x{h})")
        super().__init__(Path(path), [Level(w, h, 1.0, 1.0)])
        self._rgb = rgb

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Slice the array (``level`` is always 0)."""
        return self._rgb[y:y + height, x:x + width], float(x), float(y)

    def _close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


#: the largest plain image decoded whole (pixels): 2^30, 3 GiB as RGB. Pillow's own guard against
#: decompression bombs stops at 179 million (a 15000 x 12000 export), below what a slide region is;
#: the user names this file, so the guard here is memory, and the message says how to go beyond it.
PILLOW_MAX_PIXELS = 1 << 30
_PILLOW_LIMIT = threading.Lock()  # Pillow's limit is a module global: set and restored under a lock


def _open_pillow(path: Path) -> Any:
    """``Image.open(path)`` allowing up to :data:`PILLOW_MAX_PIXELS`; a larger image is a SlideError."""
    from PIL import Image

    with _PILLOW_LIMIT:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = PILLOW_MAX_PIXELS // 2  # Pillow warns above it and refuses above twice it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        except Image.DecompressionBombError:
            raise SlideError(f"{path}: too large to decode whole (plain PNG/JPEG/BMP are read into memory; "
                             f"at most {PILLOW_MAX_PIXELS / 1e6:.0f} million px): convert it to a tiled pyramidal "
                             "TIFF, e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`") from None
        finally:
            Image.MAX_IMAGE_PIXELS = before


class PillowSource(ArraySource):
    """PNG / JPEG / BMP (anything Pillow opens), decoded whole (up to :data:`PILLOW_MAX_PIXELS`)."""

    reader = "pillow"

    def __init__(self, path: Path) -> None:
        with _open_pillow(path) as image:
            image.load()
            self._info = dict(image.info)
            self._format = image.format or "image"
            rgb = _pillow_to_rgb(image)
        super().__init__(rgb, path)

    def _file_mpp(self) -> FileMpp:
        """um/px from the image's dpi (PNG pHYs in metres, JPEG JFIF, TIFF tags)."""
        dpi = self._info.get("dpi")
        if not dpi:
            return FileMpp(source=f"unknown ({self._format} has no physical resolution)")
        dx, dy = (dpi if isinstance(dpi, (tuple, list)) else (dpi, dpi))[:2]
        source = "file: PNG pHYs" if self._format == "PNG" else f"file: {self._format} dpi"
        return FileMpp(mpp_from_resolution(float(dx), "inch"),
                        mpp_from_resolution(float(dy), "inch"), source)


def _pillow_to_rgb(image: Any) -> np.ndarray:
    """Convert a Pillow image to RGB uint8, alpha composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return rgb_from_samples(np.asarray(image).astype(np.uint16))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return composite_on_white(rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def array_source(rgb: np.ndarray, mpp: float | None, name: str = "array") -> ArraySource:
    """Wrap an in-memory image as a slide source.

    Parameters
    ----------
    rgb : ndarray
        ``(h, w)`` gray, ``(h, w, 3)`` RGB or ``(h, w, 4)`` RGBA; uint8 (or uint16).
        Alpha is composited over white.
    mpp : float or None
        um/px of the image, None when unknown.
    name : str
        Used as ``path`` in messages.

    Returns
    -------
    ArraySource
    """
    source = ArraySource(rgb, name)
    if mpp is not None:
        check_given_mpp(mpp)
        source.mpp, source.mpp_source = float(mpp), "given"
    else:
        source.mpp_source = "unknown (array given without um/px)"
    return source

