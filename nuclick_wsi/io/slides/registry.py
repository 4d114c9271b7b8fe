"""The reader registry and :func:`open_slide`: which readers exist, which to try for a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nuclick_wsi._util.optional import tiatoolbox_installed
from nuclick_wsi._util.text import read_head, reason
from nuclick_wsi.io.slides.base import PyramidSource
from nuclick_wsi.io.slides.memory import PillowSource
from nuclick_wsi.io.slides.openslide import OpenSlideSource
from nuclick_wsi.io.slides.resolution import check_given_mpp, settle_mpp
from nuclick_wsi.io.slides.tiff import TiffSource, tiff_magic
from nuclick_wsi.errors import SlideError


# --------------------------------------------------------------------------------------
# Reader registry and dispatch
# --------------------------------------------------------------------------------------


def always_available() -> str | None:
    return None


def module_available(module: str) -> Callable[[], str | None]:
    """An availability check that imports ``module`` and reports why it failed."""

    def check() -> str | None:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - e.g. a missing shared library
            return f"{module} is not available ({reason(exc)})"
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
    available: Callable[[], str | None] = always_available
    wants: Callable[[Path, bytes], bool] = lambda path, head: True


class ReaderRegistry:
    """The readers ``open_slide`` knows, and the order ``reader="auto"`` tries them in.

    An owned object: :data:`REGISTRY` is the default one (built once, by :meth:`default`), and a
    caller may build its own and pass it to :func:`open_slide`.
    """

    def __init__(self) -> None:
        self.readers: dict[str, ReaderSpec] = {}
        self.auto_order: list[str] = []

    def register(self, spec: ReaderSpec, *, auto: bool = True, before: str | None = None) -> None:
        """Add (or replace) a reader.

        Parameters
        ----------
        spec : ReaderSpec
        auto : bool
            Also try it in ``"auto"`` mode.
        before : str, optional
            Name of the reader it is tried before in ``"auto"`` mode (default: last).
        """
        self.readers[spec.name] = spec
        if spec.name in self.auto_order:
            self.auto_order.remove(spec.name)
        if auto:
            position = self.auto_order.index(before) if before in self.auto_order else len(self.auto_order)
            self.auto_order.insert(position, spec.name)

    @classmethod
    def default(cls) -> ReaderRegistry:
        """OpenSlide, tifffile (TIFFs), Pillow (the rest) and TIAToolbox's reader.

        TIAToolbox's is always known by name (so ``--reader tiatoolbox`` says how to get it) and
        tried last by ``"auto"`` only when the package is installed; folders (NGFF zarr, DICOM)
        go to it alone.
        """
        reg = cls()
        reg.register(ReaderSpec("openslide", lambda p, b: OpenSlideSource(p, b), module_available("openslide")))
        reg.register(ReaderSpec("tifffile", lambda p, b: TiffSource(p), module_available("tifffile"),
                                lambda path, head: tiff_magic(head)))
        reg.register(ReaderSpec("pillow", lambda p, b: PillowSource(p), module_available("PIL"),
                                lambda path, head: not tiff_magic(head)))
        reg.register(ReaderSpec("tiatoolbox", lambda p, b: tia_module().open_tia(p, b),
                                lambda: tia_module().tiatoolbox_unavailable()), auto=tiatoolbox_installed())
        return reg

    def readers_for_folder(self, path: Path, reader: str) -> list[str]:
        """Readers to try for a folder: TIAToolbox's, when asked for, or (installed, "auto") for a zarr
        or DICOM folder; any other folder stays "not a slide file"."""
        if not path.is_dir() or reader not in ("auto", "tiatoolbox"):
            return []
        if reader == "tiatoolbox":
            return ["tiatoolbox"]
        zarr_or_dicom = any((path / m).exists() for m in (".zgroup", ".zattrs", "zarr.json")) or any(path.glob("*.dcm"))
        return ["tiatoolbox"] if zarr_or_dicom and "tiatoolbox" in self.auto_order else []

    def candidates(self, path: Path, reader: str) -> list[str]:
        """Reader names to try for ``path``."""
        if reader == "auto":
            head = read_head(path)
            names = [name for name in self.auto_order if self.readers[name].wants(path, head)]
            return names or list(self.auto_order)
        if reader not in self.readers:
            known = ", ".join(["auto", *self.readers])
            raise SlideError(f"cannot open slide {path}: unknown reader {reader!r} "
                             f"(choose from {known})")
        return [reader]


def tia_module() -> Any:
    """The TIAToolbox reader module, imported when first asked for (it needs the extra)."""
    import importlib

    return importlib.import_module("nuclick_wsi.io.slides.tiatoolbox")


REGISTRY = ReaderRegistry.default()
"""The readers of :func:`open_slide` unless it is given another registry."""
READERS = REGISTRY.readers
"""Registered readers by name (the default registry's)."""
AUTO_ORDER = REGISTRY.auto_order
"""Readers tried, in order, by ``reader="auto"`` (the default registry's)."""


def register_reader(spec: ReaderSpec, *, auto: bool = True, before: str | None = None) -> None:
    """Add (or replace) a reader of the default registry (see :meth:`ReaderRegistry.register`)."""
    REGISTRY.register(spec, auto=auto, before=before)


def check_path(path: Path) -> None:
    """Raise SlideError for a missing or non-file path."""
    if not path.exists():
        raise SlideError(f"cannot open slide {path}: file not found")
    if path.is_dir():
        raise SlideError(f"cannot open slide {path}: is a directory, not a slide file")


def open_slide(path: str | Path, *, mpp: float | None = None, bounds_offset: bool = True,
               reader: str = "auto", registry: ReaderRegistry | None = None) -> PyramidSource:
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
    registry : ReaderRegistry, optional
        The readers to choose from (default: :data:`REGISTRY`).

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
        check_given_mpp(mpp)
    registry = registry or REGISTRY
    folder_readers = registry.readers_for_folder(path, reader)  # TIAToolbox: NGFF zarr, DICOM folders
    if not folder_readers:
        check_path(path)
    reasons = []
    for name in folder_readers or registry.candidates(path, reader):
        spec = registry.readers[name]
        unavailable = spec.available()
        if unavailable:
            reasons.append(f"{name}: {unavailable}")
            continue
        try:
            source = spec.open(path, bounds_offset)
        except Exception as exc:  # noqa: BLE001 - every refusal becomes a reason
            reasons.append(f"{name}: {reason(exc)}")
            continue
        settle_mpp(source, mpp)
        source._reopen = {"path": str(path), "bounds_offset": bounds_offset, "reader": name}
        source.reopener = reopen_slide
        return source
    raise SlideError(f"cannot open slide {path}: " + "; ".join(reasons))


def reopen_slide(args: dict[str, Any], mpp: float | None, mpp_source: str,
                  notes: list[str]) -> PyramidSource:
    """Unpickle a file-backed source by opening it again (keeps the settled mpp)."""
    source = open_slide(args["path"], bounds_offset=args["bounds_offset"],
                        reader=args["reader"])
    source.mpp, source.mpp_source, source.notes = mpp, mpp_source, notes
    source._reopen = dict(args)
    source.reopener = reopen_slide
    return source
