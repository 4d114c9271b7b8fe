"""The slide source protocol, pyramid levels and the pyramid base class every reader builds on.

Frames and conventions: :mod:`nuclick_wsi.io.slides` (the package docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from nuclick_wsi._util.text import reason
from nuclick_wsi.io.slides.pixels import WHITE, fmt_number, pad_white, resample
from nuclick_wsi.errors import SlideError


LEVEL_TOLERANCE = 0.01
"""Relative slack when picking a pyramid level: a level whose downsample exceeds the wanted
one by at most this fraction still counts (e.g. an Aperio level at 4.0003 for 4.0)."""


PAD = 3
"""Level pixels read around a region so that the resampling filter sees real neighbours."""


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
class FileMpp:
    """um/px as recorded in a file (either value may be missing)."""

    x: float | None = None
    y: float | None = None
    source: str = "unknown"


def validate_request(x: float, y: float, width: float, height: float,
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
        #: how to open it again when unpickled (set by the registry that opened it)
        self.reopener: Any = None

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

    def _file_mpp(self) -> FileMpp:
        """um/px recorded in the file (subclasses override)."""
        return FileMpp()

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
        validate_request(x, y, width, height, out_width, out_height)
        out_width, out_height = int(out_width), int(out_height)
        if self._closed:
            raise SlideError(f"{self.path}: slide is closed")
        level = self.best_level(min(width / out_width, height / out_height))
        try:
            return self._read_from_level(level, x, y, width, height, out_width, out_height)
        except Exception as exc:  # noqa: BLE001 - every read failure is reported
            raise SlideError(
                f"cannot read region x={fmt_number(x)} y={fmt_number(y)} w={fmt_number(width)} h={fmt_number(height)} "
                f"(level {level}) of {self.path}: {reason(exc)}") from exc

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
        return (self.reopener, (self._reopen, self.mpp, self.mpp_source, list(self.notes)))

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
        wx0, wx1 = max(math.floor(lx0) - PAD, ex0), min(math.ceil(lx1) + PAD, ex1)
        wy0, wy1 = max(math.floor(ly0) - PAD, ey0), min(math.ceil(ly1) + PAD, ey1)
        if wx1 <= wx0 or wy1 <= wy0:
            return np.full((out_height, out_width, 3), WHITE, np.uint8)
        arr, ox, oy = self.read_level_window(level, wx0, wy0, wx1 - wx0, wy1 - wy0)
        box = (lx0 - ox, ly0 - oy, lx1 - ox, ly1 - oy)
        arr, box = pad_around_box(arr, box)
        return resample(arr, box, out_width, out_height)


def pad_around_box(arr: np.ndarray, box: tuple[float, float, float, float]
                    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Pad ``arr`` with white so that it holds ``box`` plus a filter margin."""
    x0, y0, x1, y1 = box
    h, w = arr.shape[:2]
    left = max(0, math.ceil(PAD - x0 - 1e-9))
    top = max(0, math.ceil(PAD - y0 - 1e-9))
    right = max(0, math.ceil(x1 + PAD - w - 1e-9))
    bottom = max(0, math.ceil(y1 + PAD - h - 1e-9))
    arr = pad_white(arr, left, top, right, bottom)
    return arr, (x0 + left, y0 + top, x1 + left, y1 + top)

