"""Streaming slide reader: regions of a whole-slide image at any resolution.

A :class:`SlideSource` hands out RGB regions of a slide, addressed in level-0 pixel
coordinates of *our* frame (QuPath's: cropped to the OpenSlide bounds when those are
applied), resampled to any output size from the best pyramid level. Only the tiles or
strips a region touches are decoded, so whole-slide files are never held in memory.

Readers
-------
``openslide``
    Everything OpenSlide opens (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...).
``tifffile``
    TIFF files OpenSlide refuses (stripped or single-level TIFFs, odd layouts). Tiles or
    strips are decoded one at a time on demand, with a small cache.
``pillow``
    PNG, JPEG, BMP and the like: the whole image is decoded once.
``array``
    An in-memory image (:func:`array_source`), for tests and tiles.

More readers can be added with :func:`register_reader`.

Conventions
-----------
* Pixel ``(i, j)`` of the output of ``read_region(x, y, w, h, ow, oh)`` has its centre at
  level-0 point ``(x + (j + 0.5) * w / ow, y + (i + 0.5) * h / oh)``.
* Parts of a region outside the slide, and transparent pixels, are white (255).
* um/px is never guessed: an unknown (or implausible) resolution gives ``mpp = None``, and
  :func:`require_mpp` turns that into a :class:`~nuclick_wsi.errors.ResolutionError`.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from nuclick_wsi.errors import ResolutionError, SlideError
from nuclick_wsi.outputs.limits import MPP_RANGE, mpp_problem

__all__ = [
    "AUTO_ORDER",
    "LEVEL_TOLERANCE",
    "MPP_PLAUSIBLE_RANGE",
    "READERS",
    "Level",
    "PyramidSource",
    "ReaderSpec",
    "SlideSource",
    "array_source",
    "open_slide",
    "register_reader",
    "require_mpp",
]

LEVEL_TOLERANCE = 0.01
"""Relative slack when picking a pyramid level: a level whose downsample exceeds the wanted
one by at most this fraction still counts (e.g. an Aperio level at 4.0003 for 4.0)."""

MPP_PLAUSIBLE_RANGE = MPP_RANGE  # the one range of segment, batch and the readers (outputs.limits)
"""um/px values from a file outside this range are treated as unknown (72 dpi = 352.8 um/px
is a typical placeholder written by image libraries, not a microscope resolution)."""

MPP_MISMATCH = 0.01
"""Relative x/y um/px difference above which a note is added (the mean is used)."""

BOX_FILTER_FROM = 1.5
"""Reduction factor (level pixels per output pixel) from which area averaging is used;
below it (and when enlarging) an antialiased bicubic filter is used."""

_PAD = 3
"""Level pixels read around a region so that the resampling filter sees real neighbours."""

_CHUNK_CACHE_BYTES = 64 * 2**20

_WHITE = 255


# --------------------------------------------------------------------------------------
# Protocol and levels
# --------------------------------------------------------------------------------------


@runtime_checkable
class SlideSource(Protocol):
    """What every slide reader provides.

    Attributes
    ----------
    path : Path
        The slide file (or a name, for in-memory arrays).
    width, height : int
        Level-0 size in our frame (cropped to the OpenSlide bounds when they are applied).
    mpp : float or None
        um/px at level 0 (mean of x and y), None when unknown.
    mpp_source : str
        Where ``mpp`` came from, e.g. ``"file: openslide.mpp-x/-y"`` or ``"given (--mpp)"``.
    reader : str
        ``"openslide"``, ``"tifffile"``, ``"pillow"`` or ``"array"``.
    bounds_offset : tuple of int
        ``(bx, by)`` added to our coordinates to get OpenSlide level-0 coordinates.
    notes : list of str
        Warnings worth showing to the user (mpp mismatch, implausible resolution, bounds).
    """

    path: Path
    width: int
    height: int
    mpp: float | None
    mpp_source: str
    reader: str
    bounds_offset: tuple[int, int]
    notes: list[str]

    def read_region(
        self, x: float, y: float, width: float, height: float, out_width: int, out_height: int
    ) -> np.ndarray:
        """Return the level-0 rectangle resampled to ``(out_height, out_width, 3)`` uint8."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


@dataclass(frozen=True)
class Level:
    """One pyramid level, in the file's own level-0 frame.

    Attributes
    ----------
    width, height : int
        Size of the level in its own pixels.
    downsample_x, downsample_y : float
        Level-0 pixels per level pixel along x and y.
    """

    width: int
    height: int
    downsample_x: float
    downsample_y: float

    @property
    def downsample(self) -> float:
        """Mean of the x and y downsamples."""
        return (self.downsample_x + self.downsample_y) / 2


@dataclass(frozen=True)
class _FileMpp:
    """um/px as recorded in a file (either value may be missing)."""

    x: float | None = None
    y: float | None = None
    source: str = "unknown"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    """Collapse whitespace so that an error reason fits on one line."""
    return " ".join(str(text).split()) or "unknown error"


def _reason(exc: BaseException) -> str:
    """A one-line reason for an exception (its message, else its type)."""
    return _one_line(exc) if str(exc).strip() else type(exc).__name__


def _composite_on_white(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite an ``(..., 4)`` uint8 RGBA array over white; return RGB uint8."""
    alpha = rgba[..., 3:4].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32) * (255 if premultiplied else alpha)
    out = (rgb + _WHITE * (255 - alpha) + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Bring uint8 / uint16 samples to uint8 (uint16 is rescaled by 1/257)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    raise SlideError(f"unsupported sample type {arr.dtype} (only 8- or 16-bit images)")


def _rgb_from_samples(arr: np.ndarray, alpha: str | None = None) -> np.ndarray:
    """Make an RGB uint8 array from gray, gray+alpha, RGB or RGBA samples.

    Parameters
    ----------
    arr : ndarray
        ``(h, w)`` or ``(h, w, s)`` with ``s`` in 1..4 (more samples: the first 3 are used).
    alpha : {None, "straight", "premultiplied"}
        How to treat a last sample beyond gray/RGB; None drops it.
    """
    arr = _to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        arr = arr[..., None]
    samples = arr.shape[2]
    if samples in (1, 2):
        gray = np.repeat(arr[..., :1], 3, axis=2)
        if samples == 2 and alpha:
            return _composite_on_white(np.concatenate([gray, arr[..., 1:2]], axis=2),
                                       alpha == "premultiplied")
        return np.ascontiguousarray(gray)
    if samples >= 4 and alpha:
        return _composite_on_white(arr[..., :4], alpha == "premultiplied")
    return np.ascontiguousarray(arr[..., :3])


def _mpp_from_resolution(value: float | None, unit: str | None) -> float | None:
    """um/px from a pixels-per-unit resolution; None for no value, zero or no unit."""
    microns = {"inch": 25400.0, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0}
    if value is None or unit not in microns or not math.isfinite(value) or value <= 0:
        return None
    return microns[unit] / value


def _tiff_magic(head: bytes) -> bool:
    """True when the first bytes are a TIFF / BigTIFF header."""
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_head(path: Path, size: int = 16) -> bytes:
    """First bytes of a file (empty on failure)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def _fmt(value: float) -> str:
    """Compact number for messages."""
    return f"{value:.6g}"


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------


def _pad_white(arr: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """Pad an RGB array with white on each side (no copy when nothing to pad)."""
    if left == top == right == bottom == 0:
        return arr
    return np.pad(arr, ((top, bottom), (left, right), (0, 0)), constant_values=_WHITE)


def _is_integral(values: tuple[float, ...]) -> bool:
    """True when all values are (within 1e-9) integers."""
    return all(abs(v - round(v)) < 1e-9 for v in values)


def _resample(arr: np.ndarray, box: tuple[float, float, float, float],
              out_width: int, out_height: int) -> np.ndarray:
    """Resample ``box`` (x0, y0, x1, y1 in ``arr`` pixels) of an RGB array to the output size.

    A box of exactly the output size on whole pixels is copied; a reduction by at least
    :data:`BOX_FILTER_FROM` on both axes uses area averaging (PIL ``BOX``), anything else
    an antialiased bicubic filter. PIL takes the float box exactly and uses the pixels
    around it for the filter support.
    """
    x0, y0, x1, y1 = box
    if _is_integral(box) and round(x1 - x0) == out_width and round(y1 - y0) == out_height:
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


def _validate_request(x: float, y: float, width: float, height: float,
                      out_width: int, out_height: int) -> None:
    """Raise ValueError for a region that cannot be read."""
    for name, value in (("x", x), ("y", y), ("width", width), ("height", height)):
        if not math.isfinite(value):
            raise ValueError(f"read_region: {name} must be finite, got {value!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"read_region: width and height must be > 0, got {width} x {height}")
    if int(out_width) != out_width or int(out_height) != out_height:
        raise ValueError("read_region: out_width and out_height must be integers")
    if out_width < 1 or out_height < 1:
        raise ValueError(f"read_region: output size must be >= 1, got {out_width} x {out_height}")


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------


class PyramidSource:
    """A slide made of pyramid levels; subclasses supply :meth:`read_level_window`.

    Parameters
    ----------
    path : Path
        The file (or a name for in-memory data).
    levels : sequence of Level
        Level 0 first, in the file's own frame.
    frame : tuple of int, optional
        ``(bx, by, width, height)``: our frame inside the file's level 0. Defaults to the
        whole of level 0.

    Notes
    -----
    A subclass implements ``read_level_window(level, x, y, w, h)`` for windows that lie
    inside the level (the base class clips requests and pads with white), returning an
    RGB uint8 array and the level coordinates of its top-left corner, which may be
    fractional (OpenSlide positions coarse levels with a float downsample).
    """

    reader = "base"

    def __init__(self, path: Path, levels: list[Level] | tuple[Level, ...],
                 frame: tuple[int, int, int, int] | None = None) -> None:
        if not levels:
            raise SlideError(f"{path}: no image levels")
        self.path = Path(path)
        self.levels: tuple[Level, ...] = tuple(levels)
        bx, by, w, h = frame if frame is not None else (0, 0, levels[0].width, levels[0].height)
        self.bounds_offset: tuple[int, int] = (int(bx), int(by))
        self.width = int(w)
        self.height = int(h)
        self.mpp: float | None = None
        self.mpp_source = "unknown"
        self.notes: list[str] = []
        self._closed = False
        self._reopen: dict[str, Any] | None = None

    # --- reader interface -------------------------------------------------------------

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Read a window of a level (inside the level) as RGB uint8.

        Returns
        -------
        rgb : ndarray
            ``(height, width, 3)`` uint8, transparent pixels already white.
        origin_x, origin_y : float
            Level coordinates of the top-left corner of ``rgb``.
        """
        raise NotImplementedError

    def _file_mpp(self) -> _FileMpp:
        """um/px recorded in the file (subclasses override)."""
        return _FileMpp()

    def _close(self) -> None:
        """Release reader resources (subclasses override)."""

    # --- public API ------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Mean downsample of each level (level 0 is 1)."""
        return tuple(level.downsample for level in self.levels)

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is at most ``downsample``.

        A level up to :data:`LEVEL_TOLERANCE` coarser than asked still counts; level 0
        is used for enlargements.
        """
        best = 0
        limit = downsample * (1 + LEVEL_TOLERANCE)
        for index, level in enumerate(self.levels):
            if level.downsample <= limit and level.downsample > self.levels[best].downsample:
                best = index
        return best

    def read_region(self, x: float, y: float, width: float, height: float,
                    out_width: int, out_height: int) -> np.ndarray:
        """Read a level-0 rectangle of our frame, resampled to the output size.

        Parameters
        ----------
        x, y : float
            Top-left corner, level-0 pixels of our frame (may lie outside the slide).
        width, height : float
            Size of the rectangle in level-0 pixels (> 0).
        out_width, out_height : int
            Size of the returned image.

        Returns
        -------
        ndarray
            ``(out_height, out_width, 3)`` uint8 RGB. Outside the slide and transparent
            pixels are white. Output pixel ``(i, j)`` is centred on level-0 point
            ``(x + (j + 0.5) * width / out_width, y + (i + 0.5) * height / out_height)``.

        Raises
        ------
        SlideError
            When the file cannot be read (names the file and the region).
        ValueError
            For a malformed request (non-finite, empty or non-integer output size).
        """
        _validate_request(x, y, width, height, out_width, out_height)
        out_width, out_height = int(out_width), int(out_height)
        if self._closed:
            raise SlideError(f"{self.path}: slide is closed")
        level = self.best_level(min(width / out_width, height / out_height))
        try:
            return self._read_from_level(level, x, y, width, height, out_width, out_height)
        except Exception as exc:  # noqa: BLE001 - every read failure is reported
            raise SlideError(
                f"cannot read region x={_fmt(x)} y={_fmt(y)} w={_fmt(width)} h={_fmt(height)} "
                f"(level {level}) of {self.path}: {_reason(exc)}") from exc

    def close(self) -> None:
        """Release the file; later reads raise :class:`SlideError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> PyramidSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, reader={self.reader!r}, "
                f"{self.width}x{self.height}, mpp={self.mpp}, levels={self.level_count}, "
                f"bounds_offset={self.bounds_offset})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle file-backed sources by reopening them (for DataLoader workers)."""
        if self._reopen is None:
            return super().__reduce_ex__(protocol)
        return (_reopen_slide, (self._reopen, self.mpp, self.mpp_source, list(self.notes)))

    # --- internals -------------------------------------------------------------------

    def _frame_extent(self, lvl: Level) -> tuple[int, int, int, int]:
        """Our frame at a level: integer (x0, y0, x1, y1), inside the level."""
        bx, by = self.bounds_offset
        x0 = max(0, math.floor(bx / lvl.downsample_x))
        y0 = max(0, math.floor(by / lvl.downsample_y))
        x1 = min(lvl.width, math.ceil((bx + self.width) / lvl.downsample_x))
        y1 = min(lvl.height, math.ceil((by + self.height) / lvl.downsample_y))
        return x0, y0, x1, y1

    def _read_from_level(self, level: int, x: float, y: float, width: float, height: float,
                         out_width: int, out_height: int) -> np.ndarray:
        """Read, pad and resample a region from one level."""
        lvl = self.levels[level]
        bx, by = self.bounds_offset
        lx0, lx1 = (x + bx) / lvl.downsample_x, (x + width + bx) / lvl.downsample_x
        ly0, ly1 = (y + by) / lvl.downsample_y, (y + height + by) / lvl.downsample_y
        ex0, ey0, ex1, ey1 = self._frame_extent(lvl)
        wx0, wx1 = max(math.floor(lx0) - _PAD, ex0), min(math.ceil(lx1) + _PAD, ex1)
        wy0, wy1 = max(math.floor(ly0) - _PAD, ey0), min(math.ceil(ly1) + _PAD, ey1)
        if wx1 <= wx0 or wy1 <= wy0:
            return np.full((out_height, out_width, 3), _WHITE, np.uint8)
        arr, ox, oy = self.read_level_window(level, wx0, wy0, wx1 - wx0, wy1 - wy0)
        box = (lx0 - ox, ly0 - oy, lx1 - ox, ly1 - oy)
        arr, box = _pad_around_box(arr, box)
        return _resample(arr, box, out_width, out_height)


def _pad_around_box(arr: np.ndarray, box: tuple[float, float, float, float]
                    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Pad ``arr`` with white so that it holds ``box`` plus a filter margin."""
    x0, y0, x1, y1 = box
    h, w = arr.shape[:2]
    left = max(0, math.ceil(_PAD - x0 - 1e-9))
    top = max(0, math.ceil(_PAD - y0 - 1e-9))
    right = max(0, math.ceil(x1 + _PAD - w - 1e-9))
    bottom = max(0, math.ceil(y1 + _PAD - h - 1e-9))
    arr = _pad_white(arr, left, top, right, bottom)
    return arr, (x0 + left, y0 + top, x1 + left, y1 + top)


# --------------------------------------------------------------------------------------
# In-memory arrays and Pillow
# --------------------------------------------------------------------------------------


class ArraySource(PyramidSource):
    """A single-level slide held in memory as an RGB uint8 array."""

    reader = "array"

    def __init__(self, rgb: np.ndarray, path: Path | str = "array") -> None:
        rgb = _rgb_from_samples(np.asarray(rgb), alpha="straight")
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


class PillowSource(ArraySource):
    """PNG / JPEG / BMP (anything Pillow opens), decoded whole."""

    reader = "pillow"

    def __init__(self, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            self._info = dict(image.info)
            self._format = image.format or "image"
            rgb = _pillow_to_rgb(image)
        super().__init__(rgb, path)

    def _file_mpp(self) -> _FileMpp:
        """um/px from the image's dpi (PNG pHYs in metres, JPEG JFIF, TIFF tags)."""
        dpi = self._info.get("dpi")
        if not dpi:
            return _FileMpp(source=f"unknown ({self._format} has no physical resolution)")
        dx, dy = (dpi if isinstance(dpi, (tuple, list)) else (dpi, dpi))[:2]
        source = "file: PNG pHYs" if self._format == "PNG" else f"file: {self._format} dpi"
        return _FileMpp(_mpp_from_resolution(float(dx), "inch"),
                        _mpp_from_resolution(float(dy), "inch"), source)


def _pillow_to_rgb(image: Any) -> np.ndarray:
    """Convert a Pillow image to RGB uint8, alpha composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _rgb_from_samples(np.asarray(image).astype(np.uint16))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite_on_white(rgba)
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
        _check_given_mpp(mpp)
        source.mpp, source.mpp_source = float(mpp), "given"
    else:
        source.mpp_source = "unknown (array given without um/px)"
    return source


# --------------------------------------------------------------------------------------
# OpenSlide
# --------------------------------------------------------------------------------------


class OpenSlideSource(PyramidSource):
    """A slide read through OpenSlide."""

    reader = "openslide"

    def __init__(self, path: Path, bounds_offset: bool = True) -> None:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) is None:
            raise SlideError("format not recognised by OpenSlide")
        self._slide = openslide.OpenSlide(str(path))
        try:
            props = dict(self._slide.properties)
            levels = [Level(w, h, float(ds), float(ds)) for (w, h), ds in
                      zip(self._slide.level_dimensions, self._slide.level_downsamples)]
            frame, note = _openslide_frame(props, levels[0], bounds_offset)
            super().__init__(path, levels, frame)
            if note:
                self.notes.append(note)
            self._props = props
            _probe(self)
        except BaseException:
            self._slide.close()
            raise

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Read via ``OpenSlide.read_region``; the origin is level-0 start / downsample."""
        ds = self._slide.level_downsamples[level]
        x0, y0 = round(x * ds), round(y * ds)
        rgba = np.asarray(self._slide.read_region((x0, y0), level, (width, height)))
        return _composite_on_white(rgba), x0 / ds, y0 / ds

    def _file_mpp(self) -> _FileMpp:
        """``openslide.mpp-x/-y``, else the TIFF resolution tags OpenSlide reports."""
        props = self._props
        mx, my = _float_prop(props, "openslide.mpp-x"), _float_prop(props, "openslide.mpp-y")
        if mx is not None or my is not None:
            return _FileMpp(mx, my, "file: openslide.mpp-x/-y")
        unit = props.get("tiff.ResolutionUnit")
        rx = _mpp_from_resolution(_float_prop(props, "tiff.XResolution"), unit)
        ry = _mpp_from_resolution(_float_prop(props, "tiff.YResolution"), unit)
        if rx is not None or ry is not None:
            return _FileMpp(rx, ry, "file: TIFF resolution tags (via OpenSlide)")
        vendor = props.get("openslide.vendor", "?")
        return _FileMpp(source=f"unknown (no openslide.mpp-x/-y in this {vendor} file)")

    def _close(self) -> None:
        self._slide.close()


def _float_prop(props: dict[str, str], key: str) -> float | None:
    """A property as float, None when absent or malformed."""
    try:
        value = float(props[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _openslide_frame(props: dict[str, str], level0: Level, apply_bounds: bool
                     ) -> tuple[tuple[int, int, int, int], str | None]:
    """Our frame ``(bx, by, w, h)`` in OpenSlide level 0, and a note about bounds."""
    full = (0, 0, level0.width, level0.height)
    if "openslide.bounds-x" not in props and "openslide.bounds-y" not in props:
        return full, None
    bx = int(props.get("openslide.bounds-x", 0))
    by = int(props.get("openslide.bounds-y", 0))
    bw = int(props.get("openslide.bounds-width", level0.width - bx))
    bh = int(props.get("openslide.bounds-height", level0.height - by))
    desc = f"x={bx} y={by} w={bw} h={bh}"
    if not apply_bounds:
        return full, f"OpenSlide bounds ({desc}) not applied: coordinates are full level-0"
    return (bx, by, bw, bh), (f"OpenSlide bounds ({desc}) applied: coordinates are QuPath's "
                              f"cropped frame (add ({bx}, {by}) for OpenSlide level 0)")


def _probe(source: PyramidSource) -> None:
    """Decode one pixel of the coarsest level so that undecodable files fail at open."""
    level = source.level_count - 1
    x0, y0, x1, y1 = source._frame_extent(source.levels[level])
    if x1 > x0 and y1 > y0:
        source.read_level_window(level, x0, y0, 1, 1)


# --------------------------------------------------------------------------------------
# tifffile
# --------------------------------------------------------------------------------------


@dataclass
class _TiffLevel:
    """Chunk layout of one TIFF page used as a pyramid level."""

    page: Any
    width: int
    height: int
    chunk_w: int
    chunk_h: int
    across: int
    down: int
    planes: int  # sample planes stored separately (1 for contiguous samples)


@dataclass
class _ChunkCache:
    """A byte-bounded LRU of decoded chunks."""

    max_bytes: int = _CHUNK_CACHE_BYTES
    items: OrderedDict = field(default_factory=OrderedDict)
    nbytes: int = 0

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple[int, int], value: np.ndarray) -> None:
        self.items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes


class TiffSource(PyramidSource):
    """A TIFF read with tifffile, decoding only the tiles or strips a region touches.

    The pyramid is tifffile's first series and its levels (generic reduced-resolution
    pages, SubIFDs, SVS, ...). Vendor geometry that only OpenSlide understands (Leica
    multi-region layouts, OpenSlide bounds) is not applied: prefer the OpenSlide reader
    for such files.
    """

    reader = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        try:
            self._tlevels = _tiff_levels(self._tif)
            base = self._tlevels[0]
            levels = [Level(t.width, t.height, base.width / t.width, base.height / t.height)
                      for t in self._tlevels]
            super().__init__(path, levels)
            self._color = _tiff_color(base.page)
            self._lock = threading.RLock()
            self._cache = _ChunkCache()
            self.chunks_decoded = 0
            _probe(self)
        except BaseException:
            self._tif.close()
            raise

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Assemble the window from decoded chunks, then convert to RGB."""
        t = self._tlevels[level]
        samples = t.page.samplesperpixel
        out = np.zeros((height, width, samples), dtype=t.page.dtype)
        for row in range(y // t.chunk_h, (y + height - 1) // t.chunk_h + 1):
            for col in range(x // t.chunk_w, (x + width - 1) // t.chunk_w + 1):
                for plane in range(t.planes):
                    self._paste_chunk(out, t, level, row, col, plane, x, y)
        return self._color(out), float(x), float(y)

    def _paste_chunk(self, out: np.ndarray, t: _TiffLevel, level: int, row: int, col: int,
                     plane: int, x: int, y: int) -> None:
        """Copy the overlap of one chunk into the window ``out`` (origin x, y)."""
        chunk = self._chunk(t, level, plane * t.across * t.down + row * t.across + col)
        cy, cx = row * t.chunk_h, col * t.chunk_w
        y0, y1 = max(cy, y), min(cy + chunk.shape[0], y + out.shape[0])
        x0, x1 = max(cx, x), min(cx + chunk.shape[1], x + out.shape[1])
        if y1 <= y0 or x1 <= x0:
            return
        part = chunk[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
        if t.planes > 1:
            out[y0 - y:y1 - y, x0 - x:x1 - x, plane] = part[..., 0]
        else:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = part

    def _chunk(self, t: _TiffLevel, level: int, index: int) -> np.ndarray:
        """Decoded chunk ``index`` of a level as ``(h, w, s)``, cropped to the image."""
        with self._lock:
            cached = self._cache.get((level, index))
            if cached is not None:
                return cached
            page = t.page
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if offset and count:
                fh = self._tif.filehandle
                fh.seek(offset)
                data = fh.read(count)
            chunk = self._decode(t, index, data)
            self._cache.put((level, index), chunk)
            self.chunks_decoded += 1
            return chunk

    def _decode(self, t: _TiffLevel, index: int, data: bytes | None) -> np.ndarray:
        """Decode one chunk; an empty (sparse) chunk becomes white."""
        page = t.page
        samples = 1 if t.planes > 1 else page.samplesperpixel
        within = index % (t.across * t.down)
        row, col = divmod(within, t.across)
        h = min(t.chunk_h, t.height - row * t.chunk_h)
        w = min(t.chunk_w, t.width - col * t.chunk_w)
        if data is None:
            white = np.iinfo(page.dtype).max if page.dtype.kind in "ui" else 1
            return np.full((h, w, samples), white, page.dtype)
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables,
                                    jpegheader=page.jpegheader)
        segment = np.asarray(segment)
        segment = segment.reshape(segment.shape[-3:]) if segment.ndim >= 3 else segment[..., None]
        return segment[:h, :w]

    def _file_mpp(self) -> _FileMpp:
        """um/px from the TIFF resolution tags, ImageJ metadata or an Aperio description."""
        return _tiff_file_mpp(self._tif, self._tlevels[0].page)

    def _close(self) -> None:
        self._tif.close()
        self._cache = _ChunkCache()


def _tiff_levels(tif: Any) -> list[_TiffLevel]:
    """The pyramid of the first series: pages from largest to smallest, 2-D images only."""
    series = tif.series[0]
    pages = []
    for lvl in series.levels:
        page = lvl.pages[0]
        page = page.aspage() if hasattr(page, "aspage") else page
        pages.append(page)
    levels: list[_TiffLevel] = []
    for page in pages:
        if getattr(page, "imagedepth", 1) != 1:
            raise SlideError("volumetric TIFF pages are not supported")
        layout = _tiff_layout(page)
        if levels and (layout.width > levels[-1].width or layout.height > levels[-1].height):
            continue
        levels.append(layout)
    if not levels:
        raise SlideError("no image in TIFF")
    return levels


def _tiff_layout(page: Any) -> _TiffLevel:
    """Chunk geometry of a page (tiles or strips, contiguous or separate samples)."""
    width, height = int(page.imagewidth), int(page.imagelength)
    if page.is_tiled:
        chunk_w, chunk_h = int(page.tilewidth), int(page.tilelength)
    else:
        chunk_w, chunk_h = width, max(1, min(int(page.rowsperstrip or height), height))
    planes = int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1
    across, down = -(-width // chunk_w), -(-height // chunk_h)
    if len(page.dataoffsets) < planes * across * down:
        raise SlideError(f"TIFF page {page.index} lists {len(page.dataoffsets)} chunks, "
                         f"expected {planes * across * down}")
    return _TiffLevel(page, width, height, chunk_w, chunk_h, across, down, planes)


def _tiff_color(page: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function turning decoded samples of ``page`` into RGB uint8 (checked at open)."""
    photometric = int(page.photometric)
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    alpha = {1: "premultiplied", 2: "straight"}.get(extras[0]) if extras else None
    if page.dtype not in (np.uint8, np.uint16) and page.dtype != np.bool_:
        raise SlideError(f"unsupported TIFF sample type {page.dtype}")
    if photometric == 3:  # palette
        colormap = _to_uint8(np.asarray(page.colormap).astype(np.uint16)).T  # (n, 3)
        return lambda arr: np.ascontiguousarray(colormap[arr[..., 0]])
    if photometric == 0:  # min-is-white: invert the gray sample, keep any alpha
        return lambda arr: _rgb_from_samples(_invert_first_sample(arr), alpha)
    if photometric in (1, 2) or (photometric == 6 and int(page.compression) in (6, 7)):
        return lambda arr: _rgb_from_samples(arr, alpha)
    raise SlideError(f"unsupported TIFF photometric interpretation {photometric} "
                     f"(compression {int(page.compression)})")


def _invert_first_sample(arr: np.ndarray) -> np.ndarray:
    """uint8 copy of ``(h, w, s)`` samples with the first one inverted (min-is-white)."""
    out = _to_uint8(arr).copy()
    out[..., 0] = 255 - out[..., 0]
    return out


def _tiff_file_mpp(tif: Any, page: Any) -> _FileMpp:
    """um/px from XResolution/YResolution + ResolutionUnit, ImageJ or Aperio metadata."""
    tags = page.tags
    if "XResolution" in tags or "YResolution" in tags:
        unit_tag = tags.get("ResolutionUnit")
        unit = _RESUNIT_NAMES.get(int(unit_tag.value) if unit_tag is not None else 2)
        rx = _rational(tags.get("XResolution"))
        ry = _rational(tags.get("YResolution"))
        if unit == "none" and tif.is_imagej:
            ij_unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
            if ij_unit in ("micron", "microns", "um", "\u00b5m", "\\u00b5m"):
                return _FileMpp(_mpp_from_resolution(rx, "micrometer"),
                                _mpp_from_resolution(ry, "micrometer"),
                                "file: ImageJ resolution (micron)")
        mx, my = _mpp_from_resolution(rx, unit), _mpp_from_resolution(ry, unit)
        if mx is not None or my is not None:
            return _FileMpp(mx, my, "file: TIFF resolution tags")
        if unit == "none":
            return _FileMpp(source="unknown (TIFF ResolutionUnit is none)")
    description = page.description or ""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if description.startswith("Aperio") and match:
        value = float(match.group(1))
        return _FileMpp(value, value, "file: Aperio ImageDescription MPP")
    return _FileMpp(source="unknown (no resolution tags in TIFF)")


_RESUNIT_NAMES = {1: "none", 2: "inch", 3: "centimeter", 4: "millimeter", 5: "micrometer"}


def _rational(tag: Any) -> float | None:
    """Value of a RATIONAL tag as float (None when absent or with a zero denominator)."""
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple):
        if len(value) < 2 or value[1] == 0:
            return None
        return value[0] / value[1]
    return float(value)


# --------------------------------------------------------------------------------------
# um/px
# --------------------------------------------------------------------------------------


def _check_given_mpp(mpp: float) -> None:
    """Raise ResolutionError unless ``mpp`` is a plausible um/px (:data:`MPP_RANGE`)."""
    if mpp_problem(mpp):
        raise ResolutionError(f"--mpp: {mpp_problem(mpp)}")


def _settle_mpp(source: PyramidSource, given: float | None) -> None:
    """Set ``mpp``, ``mpp_source`` and notes from the given value or the file."""
    found = source._file_mpp()
    values = [v for v in (found.x, found.y) if v is not None]
    file_mpp = sum(values) / len(values) if values else None
    if len(values) == 2 and abs(values[0] - values[1]) > MPP_MISMATCH * max(values):
        source.notes.append(f"um/px differs between x ({_fmt(values[0])}) and y "
                            f"({_fmt(values[1])}) in {found.source}; using the mean "
                            f"{_fmt(file_mpp)}")
    if given is not None:
        _check_given_mpp(given)
        source.mpp, source.mpp_source = float(given), "given (--mpp)"
        if file_mpp is not None and abs(file_mpp - given) > MPP_MISMATCH * given:
            source.notes.append(f"given --mpp {_fmt(given)} overrides {_fmt(file_mpp)} um/px "
                                f"from the file ({found.source})")
        return
    low, high = MPP_PLAUSIBLE_RANGE
    if file_mpp is not None and not low <= file_mpp <= high:
        source.mpp = None
        source.mpp_source = (f"unknown (file says {_fmt(file_mpp)} um/px in {found.source}, "
                             f"outside the plausible {low}-{high}: likely a placeholder)")
        source.notes.append(f"ignored implausible resolution {_fmt(file_mpp)} um/px "
                            f"({found.source}); pass --mpp")
        return
    source.mpp, source.mpp_source = file_mpp, found.source


def require_mpp(source: SlideSource) -> float:
    """Return the um/px of a source, or raise if it is unknown.

    Raises
    ------
    ResolutionError
        Naming the file and saying to pass ``--mpp``.
    """
    if source.mpp is None:
        raise ResolutionError(
            f"{source.path}: resolution (um/px) is unknown ({source.mpp_source}); "
            f"pass --mpp with the slide's level-0 um/px (e.g. --mpp 0.25 for 40x)")
    return float(source.mpp)


# --------------------------------------------------------------------------------------
# Reader registry and dispatch
# --------------------------------------------------------------------------------------


def _always_available() -> str | None:
    return None


def _module_available(module: str) -> Callable[[], str | None]:
    """An availability check that imports ``module`` and reports why it failed."""

    def check() -> str | None:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - e.g. a missing shared library
            return f"{module} is not available ({_reason(exc)})"
        return None

    return check


@dataclass(frozen=True)
class ReaderSpec:
    """How to open slides with one reader.

    Attributes
    ----------
    name : str
        Name used by ``open_slide(reader=...)``.
    open : callable
        ``open(path, bounds_offset) -> PyramidSource``; raise to refuse the file (the
        message becomes the reason shown to the user). The returned source's
        ``_file_mpp()`` gives the file's um/px.
    available : callable
        Returns None when usable, else why not (e.g. a package is missing).
    wants : callable
        ``wants(path, head) -> bool``: in ``"auto"`` mode, whether to try this reader for a
        file (``head`` is its first 16 bytes).
    """

    name: str
    open: Callable[[Path, bool], PyramidSource]
    available: Callable[[], str | None] = _always_available
    wants: Callable[[Path, bytes], bool] = lambda path, head: True


READERS: dict[str, ReaderSpec] = {}
"""Registered readers by name."""

AUTO_ORDER: list[str] = []
"""Readers tried, in order, by ``reader="auto"``."""


def register_reader(spec: ReaderSpec, *, auto: bool = True, before: str | None = None) -> None:
    """Add (or replace) a reader.

    Parameters
    ----------
    spec : ReaderSpec
    auto : bool
        Also try it in ``"auto"`` mode.
    before : str, optional
        Name of the reader it is tried before in ``"auto"`` mode (default: last).
    """
    READERS[spec.name] = spec
    if spec.name in AUTO_ORDER:
        AUTO_ORDER.remove(spec.name)
    if auto:
        position = AUTO_ORDER.index(before) if before in AUTO_ORDER else len(AUTO_ORDER)
        AUTO_ORDER.insert(position, spec.name)


register_reader(ReaderSpec("openslide", lambda p, b: OpenSlideSource(p, b),
                           _module_available("openslide")))
register_reader(ReaderSpec("tifffile", lambda p, b: TiffSource(p),
                           _module_available("tifffile"),
                           lambda path, head: _tiff_magic(head)))
register_reader(ReaderSpec("pillow", lambda p, b: PillowSource(p), _module_available("PIL"),
                           lambda path, head: not _tiff_magic(head)))

# --- optional TIAToolbox reader (extra nuclick-wsi[tiatoolbox]; code in nuclick_wsi/tia.py) ---
# Always known by name (so --reader tiatoolbox says how to get it); tried last by "auto" only when
# the package is installed. Folders (NGFF zarr, DICOM) go to it alone.


def _tia_module() -> Any:
    import importlib

    return importlib.import_module("nuclick_wsi.tia")


def _tia_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tiatoolbox") is not None


register_reader(ReaderSpec("tiatoolbox", lambda p, b: _tia_module().open_tia(p, b),
                           lambda: _tia_module().tiatoolbox_unavailable()), auto=_tia_installed())


def _folder_readers(path: Path, reader: str) -> list[str]:
    """Readers to try for a folder: TIAToolbox's, when asked for, or (installed, "auto") for a zarr
    or DICOM folder; any other folder stays "not a slide file"."""
    if not path.is_dir() or reader not in ("auto", "tiatoolbox"):
        return []
    if reader == "tiatoolbox":
        return ["tiatoolbox"]
    zarr_or_dicom = any((path / m).exists() for m in (".zgroup", ".zattrs", "zarr.json")) or any(path.glob("*.dcm"))
    return ["tiatoolbox"] if zarr_or_dicom and "tiatoolbox" in AUTO_ORDER else []
# --- end of the TIAToolbox reader ---


def _check_path(path: Path) -> None:
    """Raise SlideError for a missing or non-file path."""
    if not path.exists():
        raise SlideError(f"cannot open slide {path}: file not found")
    if path.is_dir():
        zarr = any((path / m).exists() for m in (".zgroup", ".zattrs", "zarr.json"))
        raise SlideError(f"cannot open slide {path}: " + ("an OME-Zarr folder: opened by TIAToolbox's reader "
                         "(pip install 'nuclick-wsi[tiatoolbox]', --reader auto or tiatoolbox)" if zarr
                         else "is a directory, not a slide file"))
    truncated = _tiff_truncated(path)
    if truncated:
        raise SlideError(f"cannot open slide {path}: {truncated}")


def _tiff_truncated(path: Path) -> str | None:
    """Why a TIFF (SVS, NDPI...) is cut short: an image directory or image data past the end of the file."""
    import struct

    head = _read_head(path)
    size = path.stat().st_size
    big = head[2:4] in (b"+\0", b"\0+")
    if head[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return None
    end = "<" if head[:1] == b"I" else ">"
    count_fmt, entry, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    with open(path, "rb") as fh:
        raw = fh.read(16)
        ifd = struct.unpack(end + off_fmt, raw[8:16] if big else raw[4:8])[0] if len(raw) >= (16 if big else 8) else size
        for _ in range(4096):  # walk the chain of image directories
            if ifd == 0:
                break
            fh.seek(ifd)
            got = fh.read(struct.calcsize(count_fmt))
            if ifd >= size or len(got) < struct.calcsize(count_fmt):
                return (f"truncated TIFF: an image directory is at byte {ifd} but the file ends at byte {size} "
                        "(an interrupted copy or download?)")
            n = struct.unpack(end + count_fmt, got)[0]
            fh.seek(ifd + len(got) + n * entry)
            nxt = fh.read(struct.calcsize(off_fmt))
            if len(nxt) < struct.calcsize(off_fmt):
                return f"truncated TIFF: the image directory at byte {ifd} runs past the end of the file ({size} bytes)"
            ifd = struct.unpack(end + off_fmt, nxt)[0]
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            end = max((o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception:  # noqa: BLE001 - the readers say what else is wrong
        return None
    if end > size:
        return (f"truncated TIFF: its image data reach byte {end} but the file ends at byte {size} "
                "(an interrupted copy or download?)")
    return None


def _candidates(path: Path, reader: str) -> list[str]:
    """Reader names to try for ``path``."""
    if reader == "auto":
        head = _read_head(path)
        names = [name for name in AUTO_ORDER if READERS[name].wants(path, head)]
        return names or list(AUTO_ORDER)
    if reader not in READERS:
        known = ", ".join(["auto", *READERS])
        raise SlideError(f"cannot open slide {path}: unknown reader {reader!r} "
                         f"(choose from {known})")
    return [reader]


def open_slide(path: str | Path, *, mpp: float | None = None, bounds_offset: bool = True,
               reader: str = "auto") -> PyramidSource:
    """Open a slide for streaming region reads.

    Parameters
    ----------
    path : str or Path
        Slide file (SVS, NDPI, MRXS, TIFF, PNG, JPEG, ...).
    mpp : float, optional
        um/px at level 0; overrides the file's value.
    bounds_offset : bool
        Use QuPath's frame (cropped to ``openslide.bounds-*``) when the file has bounds.
        False: the full OpenSlide level-0 frame. Only OpenSlide reports bounds; other
        readers always use the whole image.
    reader : str
        ``"auto"`` (OpenSlide, then tifffile for TIFFs, then Pillow, then TIAToolbox's reader
        when installed), or a reader name from :data:`READERS`.

    Returns
    -------
    PyramidSource
        A :class:`SlideSource`; its ``mpp`` is None when unknown (see :func:`require_mpp`).

    Raises
    ------
    SlideError
        The file does not exist, the reader is unknown or unavailable, or no reader can
        open and decode it; one line naming the file and each reader's reason.
    ResolutionError
        ``mpp`` is given but not a positive number.
    """
    path = Path(path)
    if mpp is not None:
        _check_given_mpp(mpp)
    folder_readers = _folder_readers(path, reader)  # TIAToolbox: NGFF zarr, DICOM folders
    if not folder_readers:
        _check_path(path)
    reasons = []
    for name in folder_readers or _candidates(path, reader):
        spec = READERS[name]
        unavailable = spec.available()
        if unavailable:
            reasons.append(f"{name}: {unavailable}")
            continue
        try:
            source = spec.open(path, bounds_offset)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes a reason
            reasons.append(f"{name}: {_reason(exc)}")
            continue
        _settle_mpp(source, mpp)
        source._reopen = {"path": str(path), "bounds_offset": bounds_offset, "reader": name}
        return source
    raise SlideError(f"cannot open slide {path}: " + "; ".join(reasons))


def _reopen_slide(args: dict[str, Any], mpp: float | None, mpp_source: str,
                  notes: list[str]) -> PyramidSource:
    """Unpickle a file-backed source by opening it again (keeps the settled mpp)."""
    source = open_slide(args["path"], bounds_offset=args["bounds_offset"],
                        reader=args["reader"])
    source.mpp, source.mpp_source, source.notes = mpp, mpp_source, notes
    source._reopen = dict(args)
    return source
