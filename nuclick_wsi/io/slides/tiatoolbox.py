"""TIAToolbox as an optional backend: its slide readers and its pretrained NuClick weights.

Install with ``pip install "nuclick-wsi[tiatoolbox]"``. Nothing here imports TIAToolbox at module
level, and the core never imports this module unless a TIAToolbox reader or weight name is asked for.

Reader
    :class:`TiaSource` wraps ``tiatoolbox.wsicore.wsireader.WSIReader.open`` (OME-TIFF, DICOM, JPEG 2000,
    OME-NGFF zarr, the OpenSlide formats, PNG/JPEG) behind our :class:`~nuclick_wsi.io.slides.base.PyramidSource`,
    registered as reader ``"tiatoolbox"``: ``open_slide(path, reader="tiatoolbox")``, and in
    ``reader="auto"`` as the last resort after OpenSlide, tifffile and Pillow. Our conventions hold
    whichever reader is used:

    * um/px: our own rule first (OpenSlide's ``openslide.mpp-x/-y`` or TIFF resolution tags, TIFF
      resolution tags / ImageJ / Aperio metadata read by our code, PNG/JPEG dpi); TIAToolbox's
      ``info.mpp`` only for formats our code cannot read (OME-XML, DICOM, JPEG 2000, NGFF); ``--mpp``
      overrides. TIAToolbox reads no um/px from the resolution tags of some plain TIFFs; we do.
    * the frame: for files TIAToolbox opens through OpenSlide, QuPath's frame (cropped to
      ``openslide.bounds-*``) as with our OpenSlide reader.

Weights
    ``load_model("tiatoolbox:nuclick_original-pannuke")`` (CLI ``--weights tiatoolbox:NAME``) resolves the
    name through TIAToolbox's own download and cache (:func:`tiatoolbox_weights_path`);
    ``nuclick_original-pannuke`` loads into :class:`~nuclick_wsi.model.architectures.nuclick.NuClickNet`,
    ``nuclick_light-pannuke`` into :class:`~nuclick_wsi.model.architectures.tia_unet.TiaLightUNet`.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from nuclick_wsi._util.optional import EXTRA_HINT, tiatoolbox_installed
from nuclick_wsi._util.text import read_head, reason
from nuclick_wsi.errors import SlideError
from nuclick_wsi.io.slides.base import FileMpp, Level, PyramidSource
from nuclick_wsi.io.slides.memory import PillowSource
from nuclick_wsi.io.slides.openslide import OpenSlideSource, openslide_frame
from nuclick_wsi.io.slides.pixels import rgb_from_samples
from nuclick_wsi.io.slides.resolution import settle_mpp
from nuclick_wsi.io.slides.tiff import tiff_file_mpp, tiff_levels, tiff_magic

__all__ = [
    "TiaSource",
    "tiatoolbox_source",
    "tiatoolbox_unavailable",
]

# --------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------


def tiatoolbox_unavailable() -> str | None:
    """None when TIAToolbox's reader can be used, else why not (one line, with the fix).

    Nothing is cached here: Python keeps a module that imported (``sys.modules``), and a failed
    import is tried again, so a fixed installation is seen without a restart.
    """
    if not tiatoolbox_installed():
        return f"TIAToolbox is not installed ({EXTRA_HINT})"
    try:
        import tiatoolbox.wsicore.wsireader  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. a missing shared library or a version clash
        return f"TIAToolbox is installed but cannot be imported ({reason(exc)})"
    return None


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


class TiaSource(PyramidSource):
    """A slide read through TIAToolbox's ``WSIReader``.

    Parameters
    ----------
    path : str, Path, ndarray or tiatoolbox WSIReader
        A slide file or folder (NGFF zarr, DICOM), an ``(h, w, 3)`` image, or an open ``WSIReader``.
    bounds_offset : bool
        For files TIAToolbox opens through OpenSlide: use QuPath's frame (cropped to
        ``openslide.bounds-*``), as :class:`~nuclick_wsi.io.slides.openslide.OpenSlideSource` does.

    Notes
    -----
    Windows are read with ``read_rect(..., resolution=level, units="level")`` (no resampling by
    TIAToolbox); our base class does the resampling, so regions are the same pixels as with our
    readers. ``mpp`` is settled by :func:`~nuclick_wsi.io.slides.registry.open_slide` (or :func:`tiatoolbox_source`).
    """

    reader = "tiatoolbox"

    def __init__(self, path: Any, bounds_offset: bool = True) -> None:
        unavailable = tiatoolbox_unavailable()
        if unavailable:
            raise SlideError(unavailable)
        from tiatoolbox.wsicore.wsireader import WSIReader

        if isinstance(path, WSIReader):
            wsi, name = path, str(getattr(path, "input_path", None) or "tiatoolbox-reader")
        elif isinstance(path, np.ndarray):
            wsi, name = WSIReader.open(path), "array"
        else:
            wsi, name = WSIReader.open(Path(path)), str(path)
        self._wsi = wsi
        self._kind = type(wsi).__name__
        self._openslide = getattr(wsi, "openslide_wsi", None)
        info = wsi.info
        dims = [tuple(int(v) for v in d) for d in info.level_dimensions]
        downs = [float(np.mean(d)) for d in (info.level_downsamples or [])]
        notes = [f"read with TIAToolbox {self._kind}"]
        if self._kind == "NGFFWSIReader" and len(dims) > 1:
            # TIAToolbox 1.x leaves NGFF downsamples at [1.0] and its read_rect indexes coarser levels
            # with level-0 coordinates: only level 0 is read right
            dims, downs = dims[:1], [1.0]
            notes.append("TIAToolbox's NGFF reader reads only level 0 correctly: coarser levels not used")
        if self._openslide is not None:  # the exact downsamples OpenSlide positions reads with
            downs = [float(d) for d in self._openslide.level_downsamples]
        levels = [Level(w, h, ds, ds) for (w, h), ds in zip(dims, downs)]
        frame, note = None, None
        if self._openslide is not None:
            frame, note = openslide_frame(dict(self._openslide.properties), levels[0], bounds_offset)
        super().__init__(Path(name), levels, frame)
        self.notes.extend(notes)
        if note:
            self.notes.append(note)
        self._lock = threading.Lock()
        self._probe()

    def _probe(self) -> None:
        """Read one pixel of the coarsest level so that undecodable files fail at open."""
        level = self.level_count - 1
        x0, y0, x1, y1 = self._frame_extent(self.levels[level])
        if x1 > x0 and y1 > y0:
            self.read_level_window(level, x0, y0, 1, 1)

    def read_level_window(self, level: int, x: int, y: int, width: int,
                          height: int) -> tuple[np.ndarray, float, float]:
        """Read a window of a level with ``read_rect(units="level")``.

        TIAToolbox takes the location in level-0 pixels: OpenSlide-backed readers read from that exact
        level-0 point (origin ``x0 / downsample``); the others round it back to level pixels.
        """
        ds = self.levels[level].downsample_x
        x0, y0 = round(x * ds), round(y * ds)
        with self._lock:
            rgb = self._wsi.read_rect((x0, y0), (int(width), int(height)), resolution=level,
                                      units="level", pad_mode="constant",
                                      pad_constant_values=255)
        rgb = rgb_from_samples(np.asarray(rgb))
        if rgb.shape[:2] != (height, width):
            raise SlideError(f"TIAToolbox {self._kind} returned {rgb.shape[1]}x{rgb.shape[0]} pixels "
                             f"for a {width}x{height} window")
        if self._openslide is not None:
            return rgb, x0 / ds, y0 / ds
        return rgb, float(round(x0 / ds)), float(round(y0 / ds))

    def _file_mpp(self) -> FileMpp:
        """um/px: our rule on the file first, then TIAToolbox's ``info.mpp``."""
        ours = self._our_file_mpp()
        if ours.x is not None or ours.y is not None:
            return ours
        mpp = self._wsi.info.mpp
        if mpp is not None:
            values = [float(v) for v in np.ravel(mpp)[:2]]
            if len(values) == 1:
                values *= 2
            if all(math.isfinite(v) and v > 0 for v in values):
                return FileMpp(values[0], values[1], f"file: TIAToolbox {self._kind} info.mpp")
        return ours

    def _our_file_mpp(self) -> FileMpp:
        """um/px as our own readers find it (OpenSlide properties, TIFF tags, PNG/JPEG dpi)."""
        if self._openslide is not None:  # the OpenSlide reader's rule on the same properties
            return OpenSlideSource._file_mpp(SimpleNamespace(_props=dict(self._openslide.properties)))
        path = self.path
        if not path.is_file():
            return FileMpp(source=f"unknown (no um/px in this {self._kind} input)")
        head = read_head(path)
        try:
            if tiff_magic(head):
                import tifffile

                with tifffile.TiffFile(str(path)) as tif:
                    try:
                        page = tiff_levels(tif)[0].page
                    except Exception:  # noqa: BLE001 - odd layouts: the first page holds the tags
                        page = tif.pages[0]
                    return tiff_file_mpp(tif, page)
            from PIL import Image

            with Image.open(path) as image:  # reads the header only
                return PillowSource._file_mpp(SimpleNamespace(_info=dict(image.info),
                                                              _format=image.format or "image"))
        except Exception:  # noqa: BLE001 - not a TIFF or an image Pillow knows (JP2 ...): ask TIAToolbox
            return FileMpp(source=f"unknown (no um/px in this {self._kind} file)")

    def _close(self) -> None:
        closer = getattr(self._openslide, "close", None)
        if closer is not None:
            closer()
        self._wsi = None


def open_tia(path: Path, bounds_offset: bool) -> TiaSource:
    """The ``open`` of the ``"tiatoolbox"`` reader spec (see :func:`nuclick_wsi.io.slides.registry.ReaderRegistry`)."""
    return TiaSource(path, bounds_offset)


def tiatoolbox_source(image: Any, mpp: float | None = None) -> TiaSource:
    """Wrap an in-memory image or an open TIAToolbox ``WSIReader`` as a slide source.

    Parameters
    ----------
    image : ndarray or tiatoolbox WSIReader
        ``(h, w, 3)`` uint8 image, or a reader (its ``info.mpp`` counts as the file's um/px).
    mpp : float, optional
        um/px at level 0; overrides the reader's.
    """
    source = TiaSource(image)
    settle_mpp(source, mpp)
    return source


# --------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------
