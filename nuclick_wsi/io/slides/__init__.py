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


from nuclick_wsi.io.slides.base import LEVEL_TOLERANCE, Level, PyramidSource, SlideSource
from nuclick_wsi.io.slides.memory import ArraySource, PillowSource, array_source
from nuclick_wsi.io.slides.registry import AUTO_ORDER, READERS, ReaderSpec, open_slide, register_reader
from nuclick_wsi.io.slides.resolution import MPP_PLAUSIBLE_RANGE, require_mpp

__all__ = [
    "AUTO_ORDER",
    "LEVEL_TOLERANCE",
    "MPP_PLAUSIBLE_RANGE",
    "READERS",
    "ArraySource",
    "Level",
    "PillowSource",
    "PyramidSource",
    "ReaderSpec",
    "SlideSource",
    "array_source",
    "open_slide",
    "register_reader",
    "require_mpp",
]
