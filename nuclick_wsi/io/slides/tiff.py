"""The tifffile reader: tiles or strips decoded on demand, for TIFFs OpenSlide refuses."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nuclick_wsi.io.slides.base import FileMpp, Level, PyramidSource
from nuclick_wsi.io.slides.openslide import probe
from nuclick_wsi.io.slides.pixels import rgb_from_samples, to_uint8
from nuclick_wsi.io.slides.resolution import mpp_from_resolution
from nuclick_wsi.errors import SlideError


CHUNK_CACHE_BYTES = 64 * 2**20


def tiff_magic(head: bytes) -> bool:
    """True when the first bytes are a TIFF / BigTIFF header."""
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------------------
# tifffile
# --------------------------------------------------------------------------------------


@dataclass
class TiffLevel:
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
class ChunkCache:
    """A byte-bounded LRU of decoded chunks."""

    max_bytes: int = CHUNK_CACHE_BYTES
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
            self._tlevels = tiff_levels(self._tif)
            base = self._tlevels[0]
            levels = [Level(t.width, t.height, base.width / t.width, base.height / t.height)
                      for t in self._tlevels]
            super().__init__(path, levels)
            self._color = tiff_color(base.page)
            self._lock = threading.RLock()
            self._cache = ChunkCache()
            self.chunks_decoded = 0
            probe(self)
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

    def _paste_chunk(self, out: np.ndarray, t: TiffLevel, level: int, row: int, col: int,
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

    def _chunk(self, t: TiffLevel, level: int, index: int) -> np.ndarray:
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

    def _decode(self, t: TiffLevel, index: int, data: bytes | None) -> np.ndarray:
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

    def _file_mpp(self) -> FileMpp:
        """um/px from the TIFF resolution tags, ImageJ metadata or an Aperio description."""
        return tiff_file_mpp(self._tif, self._tlevels[0].page)

    def _close(self) -> None:
        self._tif.close()
        self._cache = ChunkCache()


def tiff_levels(tif: Any) -> list[TiffLevel]:
    """The pyramid of the first series: pages from largest to smallest, 2-D images only."""
    series = tif.series[0]
    pages = []
    for lvl in series.levels:
        page = lvl.pages[0]
        page = page.aspage() if hasattr(page, "aspage") else page
        pages.append(page)
    levels: list[TiffLevel] = []
    for page in pages:
        if getattr(page, "imagedepth", 1) != 1:
            raise SlideError("volumetric TIFF pages are not supported")
        layout = tiff_layout(page)
        if levels and (layout.width > levels[-1].width or layout.height > levels[-1].height):
            continue
        levels.append(layout)
    if not levels:
        raise SlideError("no image in TIFF")
    return levels


def tiff_layout(page: Any) -> TiffLevel:
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
    return TiffLevel(page, width, height, chunk_w, chunk_h, across, down, planes)


def tiff_color(page: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function turning decoded samples of ``page`` into RGB uint8 (checked at open)."""
    photometric = int(page.photometric)
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    alpha = {1: "premultiplied", 2: "straight"}.get(extras[0]) if extras else None
    if page.dtype not in (np.uint8, np.uint16) and page.dtype != np.bool_:
        raise SlideError(f"unsupported TIFF sample type {page.dtype}")
    if photometric == 3:  # palette
        colormap = to_uint8(np.asarray(page.colormap).astype(np.uint16)).T  # (n, 3)
        return lambda arr: np.ascontiguousarray(colormap[arr[..., 0]])
    if photometric == 0:  # min-is-white: invert the gray sample, keep any alpha
        return lambda arr: rgb_from_samples(invert_first_sample(arr), alpha)
    if photometric in (1, 2) or (photometric == 6 and int(page.compression) in (6, 7)):
        return lambda arr: rgb_from_samples(arr, alpha)
    raise SlideError(f"unsupported TIFF photometric interpretation {photometric} "
                     f"(compression {int(page.compression)})")


def invert_first_sample(arr: np.ndarray) -> np.ndarray:
    """uint8 copy of ``(h, w, s)`` samples with the first one inverted (min-is-white)."""
    out = to_uint8(arr).copy()
    out[..., 0] = 255 - out[..., 0]
    return out


def tiff_file_mpp(tif: Any, page: Any) -> FileMpp:
    """um/px from XResolution/YResolution + ResolutionUnit, ImageJ or Aperio metadata."""
    tags = page.tags
    if "XResolution" in tags or "YResolution" in tags:
        unit_tag = tags.get("ResolutionUnit")
        unit = RESUNIT_NAMES.get(int(unit_tag.value) if unit_tag is not None else 2)
        rx = rational(tags.get("XResolution"))
        ry = rational(tags.get("YResolution"))
        if unit == "none" and tif.is_imagej:
            ij_unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
            if ij_unit in ("micron", "microns", "um", "\u00b5m", "\\u00b5m"):
                return FileMpp(mpp_from_resolution(rx, "micrometer"),
                                mpp_from_resolution(ry, "micrometer"),
                                "file: ImageJ resolution (micron)")
        mx, my = mpp_from_resolution(rx, unit), mpp_from_resolution(ry, unit)
        if mx is not None or my is not None:
            return FileMpp(mx, my, "file: TIFF resolution tags")
        if unit == "none":
            return FileMpp(source="unknown (TIFF ResolutionUnit is none)")
    description = page.description or ""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if description.startswith("Aperio") and match:
        value = float(match.group(1))
        return FileMpp(value, value, "file: Aperio ImageDescription MPP")
    return FileMpp(source="unknown (no resolution tags in TIFF)")


RESUNIT_NAMES = {1: "none", 2: "inch", 3: "centimeter", 4: "millimeter", 5: "micrometer"}


def rational(tag: Any) -> float | None:
    """Value of a RATIONAL tag as float (None when absent or with a zero denominator)."""
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple):
        if len(value) < 2 or value[1] == 0:
            return None
        return value[0] / value[1]
    return float(value)

