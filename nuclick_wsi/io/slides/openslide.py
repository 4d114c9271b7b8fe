"""The OpenSlide reader and its bounds (QuPath's cropped frame)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nuclick_wsi.io.slides.base import FileMpp, Level, PyramidSource
from nuclick_wsi.io.slides.pixels import composite_on_white
from nuclick_wsi.io.slides.resolution import mpp_from_resolution
from nuclick_wsi.errors import SlideError


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
            frame, note = openslide_frame(props, levels[0], bounds_offset)
            super().__init__(path, levels, frame)
            if note:
                self.notes.append(note)
            self._props = props
            probe(self)
        except BaseException:
            self._slide.close()
            raise

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Read via ``OpenSlide.read_region``; the origin is level-0 start / downsample."""
        ds = self._slide.level_downsamples[level]
        x0, y0 = round(x * ds), round(y * ds)
        rgba = np.asarray(self._slide.read_region((x0, y0), level, (width, height)))
        return composite_on_white(rgba), x0 / ds, y0 / ds

    def _file_mpp(self) -> FileMpp:
        """``openslide.mpp-x/-y``, else the TIFF resolution tags OpenSlide reports."""
        props = self._props
        mx, my = float_prop(props, "openslide.mpp-x"), float_prop(props, "openslide.mpp-y")
        if mx is not None or my is not None:
            return FileMpp(mx, my, "file: openslide.mpp-x/-y")
        unit = props.get("tiff.ResolutionUnit")
        rx = mpp_from_resolution(float_prop(props, "tiff.XResolution"), unit)
        ry = mpp_from_resolution(float_prop(props, "tiff.YResolution"), unit)
        if rx is not None or ry is not None:
            return FileMpp(rx, ry, "file: TIFF resolution tags (via OpenSlide)")
        vendor = props.get("openslide.vendor", "?")
        return FileMpp(source=f"unknown (no openslide.mpp-x/-y in this {vendor} file)")

    def _close(self) -> None:
        self._slide.close()


def float_prop(props: dict[str, str], key: str) -> float | None:
    """A property as float, None when absent or malformed."""
    try:
        value = float(props[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def openslide_frame(props: dict[str, str], level0: Level, apply_bounds: bool
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


def probe(source: PyramidSource) -> None:
    """Decode one pixel of the coarsest level so that undecodable files fail at open."""
    level = source.level_count - 1
    x0, y0, x1, y1 = source._frame_extent(source.levels[level])
    if x1 > x0 and y1 > y0:
        source.read_level_window(level, x0, y0, 1, 1)

