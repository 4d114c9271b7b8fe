"""Reading a QuPath project (``project.qpproj``): images, their files, names and frames."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from nuclick_wsi.errors import NuclickError


#: folders of a QuPath project (relative to the folder holding project.qpproj)
CLICKS_DIR = ("nuclick", "clicks")
RESULTS_DIR = ("nuclick", "results")
#: measurement present on every object nuclick-wsi writes for QuPath (it holds the mean model
#: probability); import_results.groovy removes the objects that carry it before importing again
RESULT_MARKER = "NuClick score"
#: runs of characters that are illegal in file names on Windows, macOS or Linux (and control
#: characters); each run becomes one "_". The Groovy scripts hold the same pattern.
UNSAFE_FILENAME = r'[\\/:*?"<>|\x00-\x1F\x7F]+'
#: what an image name that is empty after replacement becomes
EMPTY_NAME = "unnamed"
CLICK_SUFFIXES = (".geojson", ".geojson.gz")
WRAPPED_SAME_FRAME = ("pyramidize",)  #: wrapped builders whose pixels keep the wrapped image's frame


class ProjectError(NuclickError):
    """A project.qpproj that cannot be read (names the file and what is wrong)."""


def safe_name(image_name: str) -> str:
    """The file-name form of a QuPath image name (same rule as the Groovy scripts).

    Each run of ``\\ / : * ? " < > |`` and control characters becomes ``_``; an empty result
    becomes ``"unnamed"``. Everything else (spaces, dots, accents) is kept, so
    ``"MTA3-8 (2).svs"`` stays ``"MTA3-8 (2).svs"``.
    """
    out = re.sub(UNSAFE_FILENAME, "_", image_name)
    return out if out.strip(" ") else EMPTY_NAME  # (Java's trim(): only spaces can remain at the ends)


# --------------------------------------------------------------------------------------------
# reading project.qpproj


@dataclass
class ProjectImage:
    """One entry of a QuPath project, as far as nuclick-wsi needs it."""

    index: int  #: position in ``images`` (0-based)
    name: str  #: ``imageName`` as QuPath shows it
    file_name: str  #: :func:`safe_name` of ``name``: the clicks/results file stem
    entry_id: str | None = None
    uri: str | None = None
    path: Path | None = None  #: the slide here (resolved; may not exist)
    provider: str = ""  #: ``providerClassName``
    args: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  #: width, height from the project's metadata
    mpp: float | None = None  #: um/px from the project's metadata
    problem: str | None = None  #: why this entry cannot be segmented (a wrapped server, a URL...)


@dataclass
class QuPathProject:
    """A parsed project.qpproj."""

    file: Path
    version: str | None
    images: list[ProjectImage]

    @property
    def base(self) -> Path:
        return self.file.parent

    @property
    def clicks_dir(self) -> Path:
        return self.base.joinpath(*CLICKS_DIR)

    @property
    def results_dir(self) -> Path:
        return self.base.joinpath(*RESULTS_DIR)

    def clicks_file(self, image: ProjectImage) -> Path | None:
        """The exported clicks of ``image`` (``.geojson``, else ``.geojson.gz``), or None."""
        for suffix in CLICK_SUFFIXES:
            p = self.clicks_dir / f"{image.file_name}{suffix}"
            if p.is_file():
                return p
        return None


def pure_path(uri: str) -> PurePath:
    """The file path of a ``file:`` URI, in the flavour of the system that wrote it."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise ValueError(f"not a local file ({parts.scheme or 'no'} URI)")
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        return PureWindowsPath(f"//{parts.netloc}{path}")  # UNC share
    if re.match(r"^/[A-Za-z]:", path):
        return PureWindowsPath(path[1:])
    if re.match(r"^[A-Za-z]:[/\\]", path):
        return PureWindowsPath(path)
    return PurePosixPath(path)


def _local(pure: PurePath) -> Path | None:
    """``pure`` as a path on this machine, or None when it is another system's path."""
    if isinstance(pure, PureWindowsPath) and os.name != "nt":
        return None
    return Path(str(pure))


def resolve_uri(uri: str, project_file: Path, project_uri: str | None = None) -> Path:
    """The slide file of an image URI, here.

    The URI's own path is used when it exists. Otherwise, like QuPath when a project has been
    moved, the path relative to where the project was saved (``project_uri``) is tried relative
    to where it is now; this also carries projects between Windows and Linux/macOS.

    Raises
    ------
    ValueError
        For a URI that is not a local file (OMERO, http...).
    """
    pure = pure_path(uri)
    here = _local(pure)
    if here is not None and here.exists():
        return here
    if project_uri:
        try:
            old_base = pure_path(project_uri).parent
            rel = pure.relative_to(old_base) if type(pure) is type(old_base) else None
        except ValueError:
            rel = None
        if rel is not None:
            moved = project_file.parent.joinpath(*rel.parts)
            if moved.exists():
                return moved
    return here if here is not None else Path(pure.as_posix())


def _metadata_size(meta: Any) -> tuple[int, int] | None:
    if isinstance(meta, dict):
        w, h = meta.get("width"), meta.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return w, h
    return None


def _metadata_mpp(meta: Any) -> float | None:
    try:
        cal = meta["pixelCalibration"]
        pw, ph = cal["pixelWidth"], cal["pixelHeight"]
        unit = str(pw.get("unit", ""))
        w, h = float(pw["value"]), float(ph["value"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if unit not in ("µm", "μm", "um", "microns", "micrometer", "micrometers") or not (w > 0 and h > 0):
        return None
    return (w + h) / 2


def _image(index: int, entry: Any, file: Path, project_uri: str | None) -> ProjectImage:
    where = f"images[{index}]"
    if not isinstance(entry, dict):
        raise ProjectError(f"{file}: {where} is not a JSON object")
    builder = entry.get("serverBuilder")
    meta = builder.get("metadata") if isinstance(builder, dict) else None
    name = entry.get("imageName")
    if not isinstance(name, str) or not name:
        name = meta.get("name") if isinstance(meta, dict) and isinstance(meta.get("name"), str) else None
    entry_id = entry.get("entryID")
    image = ProjectImage(index=index, name=name or "", file_name="",
                         entry_id=None if entry_id is None else str(entry_id))
    # unwrap builders that keep the frame (their metadata still describes the image QuPath shows)
    while isinstance(builder, dict) and builder.get("builderType") in WRAPPED_SAME_FRAME:
        builder = builder.get("builder")
    if not isinstance(builder, dict):
        image.problem = "no serverBuilder in the project entry"
    else:
        kind = builder.get("builderType", "uri")
        if kind != "uri":
            image.problem = (f"its image server is {kind!r} (a transformed or combined image); "
                             "nuclick-wsi reads images opened directly from a file")
        image.provider = str(builder.get("providerClassName") or "")
        args = builder.get("args") or []
        image.args = tuple(str(a) for a in args) if isinstance(args, list) else ()
        uri = builder.get("uri")
        if uri is None and isinstance(builder.get("uris"), list) and builder["uris"]:
            uri = builder["uris"][0]
        if kind == "uri":
            if not isinstance(uri, str) or not uri:
                image.problem = "no image URI in the project entry"
            else:
                image.uri = uri
                try:
                    image.path = resolve_uri(uri, file, project_uri)
                except ValueError as exc:
                    image.problem = f"{uri}: {exc}; nuclick-wsi reads local slide files"
    if isinstance(meta, dict):
        image.size = _metadata_size(meta)
        image.mpp = _metadata_mpp(meta)
    if not image.name:
        image.name = image.path.name if image.path is not None else f"image {index}"
    image.file_name = safe_name(image.name)
    return image


def read_project(path: str | os.PathLike) -> QuPathProject:
    """Read a QuPath project (``project.qpproj``, or the folder holding it).

    Raises
    ------
    ProjectError
        Missing or empty file, broken JSON (naming line and column), or JSON that is not a QuPath
        project (naming what is wrong).
    """
    file = Path(path)
    if file.is_dir():
        file = file / "project.qpproj"
    if not file.is_file():
        raise ProjectError(f"{file}: QuPath project file not found")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{file}: cannot read: {exc}") from exc
    if not text.strip():
        raise ProjectError(f"{file}: empty file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{file}: broken JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise ProjectError(f"{file}: JSON nested too deeply") from exc
    if not isinstance(obj, dict):
        raise ProjectError(f"{file}: not a QuPath project (expected a JSON object, found {type(obj).__name__})")
    images = obj.get("images", [])
    if not isinstance(images, list):
        raise ProjectError(f"{file}: not a QuPath project ('images' is {type(images).__name__}, not a list)")
    project_uri = obj.get("uri") if isinstance(obj.get("uri"), str) else None
    version = obj.get("version") if isinstance(obj.get("version"), str) else None
    parsed = [_image(i, e, file, project_uri) for i, e in enumerate(images)]
    return QuPathProject(file=file.resolve(), version=version, images=parsed)


# --------------------------------------------------------------------------------------------
# the frame rule


def _is_openslide(provider: str) -> bool:
    return "openslide" in provider.lower()


def _provider_short(provider: str) -> str:
    return provider.rsplit(".", 1)[-1] or "unknown server"


def bounds_rule(image: ProjectImage, cropped: tuple[int, int], full: tuple[int, int],
                offset: tuple[int, int]) -> tuple[bool, str]:
    """Whether QuPath's coordinates for ``image`` are in the frame cropped to the OpenSlide bounds.

    Parameters
    ----------
    image : ProjectImage
        The project entry (provider, args, size).
    cropped, full : (int, int)
        Width and height of the slide here, cropped to the OpenSlide bounds and uncropped.
    offset : (int, int)
        The OpenSlide bounds offset (0, 0 when the file has none).

    Returns
    -------
    (bool, str)
        ``bounds_offset`` for :func:`~nuclick_wsi.pipeline.segment`, and why.
    """
    short = _provider_short(image.provider)
    if offset == (0, 0):
        return True, "no OpenSlide bounds: one frame"
    if _is_openslide(image.provider):
        if "--no-crop" in image.args:
            return False, f"{short} with --no-crop: QuPath uses OpenSlide's full level 0"
        return True, f"{short}: QuPath offsets the image by the OpenSlide bounds {offset}"
    if image.size is not None and image.size == cropped and cropped != full:
        return True, f"{short}: the project's image is {image.size[0]} x {image.size[1]}, the bounds' size"
    return False, f"{short} does not apply OpenSlide bounds: full level 0"


def check_size(image: ProjectImage, cropped: tuple[int, int], full: tuple[int, int]) -> None:
    if image.size is None or image.size in (cropped, full):
        return
    extra = f" with args {' '.join(image.args)}" if image.args else ""
    here = f"{full[0]} x {full[1]}" + (f" ({cropped[0]} x {cropped[1]} cropped to its bounds)" if cropped != full else "")
    raise NuclickError(
        f"the project's image is {image.size[0]} x {image.size[1]} px ({_provider_short(image.provider)}{extra}) "
        f"but {image.path} opens here as {here}; nuclick-wsi reads the main image of the file")


