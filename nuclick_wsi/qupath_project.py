"""QuPath projects: segment the exported clicks of every image of a ``project.qpproj``.

The round trip a QuPath user makes (see README, "QuPath users")::

    QuPath: workflows/qupath/export_clicks.groovy   -> PROJECT/nuclick/clicks/<name>.geojson
    shell:  nuclick-wsi qupath run PROJECT/project.qpproj
                                                     -> PROJECT/nuclick/results/<name>.geojson
                                                        (+ <name>.labels.zarr, <name>.report.json)
    QuPath: workflows/qupath/import_results.groovy  <- PROJECT/nuclick/results/<name>.geojson

``<name>`` is the project entry's ``imageName`` with the characters that are illegal in file
names on some system replaced by ``_`` (:func:`safe_name`; the Groovy scripts use the very same
pattern, and a test checks that they do).

Facts about ``project.qpproj`` this module relies on (QuPath 0.2-0.6, ``qupath-core``
``DefaultProject``/``ImageServers``/``ImageServerBuilder``; real project files confirm them):

- It is plain JSON with an ``images`` array; each entry has ``entryID``, ``imageName``,
  ``randomizedName`` and ``serverBuilder``. The project's own ``uri`` is where it was saved.
- ``serverBuilder.builderType`` is ``"uri"`` for an image read directly from a file
  (``providerClassName``, ``uri``, ``args``, ``metadata``), and ``"rotated"``, ``"affine"``,
  ``"cropped"``, ``"pyramidize"``, ``"channels"`` or ``"sparse"`` for wrapped servers (these hold
  the wrapped builder in ``builder``).
- ``uri`` is a ``file:`` URI written by Java: ``file:/home/u/a%20b.svs``, ``file:/D:/x.svs``
  (percent-encoded; spaces become ``%20``).
- ``args`` are the server's arguments, e.g. ``["--series", "0"]`` for Bio-Formats or
  ``["--no-crop"]`` for OpenSlide.
- ``metadata`` (when present) holds the image ``width``/``height`` as QuPath sees it and its
  ``pixelCalibration``.

Which frame QuPath's coordinates are in (``qupath-extension-openslide``,
``OpenslideImageServer``): the OpenSlide server offsets every read by ``openslide.bounds-x/-y``
when all four ``openslide.bounds-*`` properties exist, unless ``--no-crop`` is among its args.
Other servers (Bio-Formats, ImageIO) know nothing of OpenSlide bounds: QuPath's frame is the image
as that library decodes it, which for most formats is OpenSlide's full level 0; where it is not
(e.g. a Leica SCN image, which Bio-Formats opens as its own series), the image size stored in the
project tells which frame it is. See :func:`bounds_rule`.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from .atomic import atomic_output, cleanup_temporaries
from .errors import ModelError, NuclickError
from .pipeline import SegmentOptions, output_paths, outputs_complete, segment
from .slide import open_slide

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


def _pure_path(uri: str) -> PurePath:
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
    pure = _pure_path(uri)
    here = _local(pure)
    if here is not None and here.exists():
        return here
    if project_uri:
        try:
            old_base = _pure_path(project_uri).parent
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


def _check_size(image: ProjectImage, cropped: tuple[int, int], full: tuple[int, int]) -> None:
    if image.size is None or image.size in (cropped, full):
        return
    extra = f" with args {' '.join(image.args)}" if image.args else ""
    here = f"{full[0]} x {full[1]}" + (f" ({cropped[0]} x {cropped[1]} cropped to its bounds)" if cropped != full else "")
    raise NuclickError(
        f"the project's image is {image.size[0]} x {image.size[1]} px ({_provider_short(image.provider)}{extra}) "
        f"but {image.path} opens here as {here}; nuclick-wsi reads the main image of the file")


# --------------------------------------------------------------------------------------------
# running


@dataclass
class ImageOutcome:
    """What happened to one project image."""

    name: str
    status: str  #: "segmented", "complete" (skipped), "no clicks", "failed"
    message: str = ""
    clicks: Path | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    bounds: str = ""
    seconds: float = 0.0


@dataclass
class ProjectRun:
    """The outcome of :func:`run_project`."""

    project: QuPathProject
    images: list[ImageOutcome]
    summary_path: Path | None = None

    @property
    def failed(self) -> list[ImageOutcome]:
        return [o for o in self.images if o.status == "failed"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.images:
            out[o.status] = out.get(o.status, 0) + 1
        return out


def _fresh(paths: dict[str, Path], clicks: Path, ngff: str | None = None) -> bool:
    """Complete outputs (label stores of NGFF ``ngff`` if given) written after the clicks file last changed."""
    if not outputs_complete(paths, ngff):
        return False
    return paths["report"].stat().st_mtime >= clicks.stat().st_mtime


def run_project(project: QuPathProject | str | os.PathLike, *, options: SegmentOptions | None = None,
                model=None, weights: str | None = None, predictor=None, gland_model=None,
                gland_weights: str | None = None, bounds_offset: bool | None = None, force: bool = False,
                log: Callable[[str], None] | None = None) -> ProjectRun:
    """Segment the exported clicks of every image of a QuPath project.

    For each image with ``PROJECT/nuclick/clicks/<name>.geojson``: resolve its slide from the
    project's URI, choose the frame (:func:`bounds_rule`, unless ``bounds_offset`` is given),
    segment, and write ``PROJECT/nuclick/results/<name>.geojson`` with ``<name>.labels.zarr`` and
    ``<name>.report.json`` beside it. Images whose outputs are complete and newer than their
    clicks are skipped (``force`` redoes them); an image that fails is reported and the others go
    on. Models are loaded once, when the first image needs them. A summary is written to
    ``PROJECT/nuclick/results/summary.json``.

    Parameters
    ----------
    project : QuPathProject or path
        The project (file or folder).
    options : SegmentOptions, optional
        Options for every image; ``bounds_offset`` in it is ignored (see ``bounds_offset``), and
        ``mpp`` falls back to the project's pixel size for slides whose files have none.
    model, weights, predictor
        The nucleus model, as for :func:`~nuclick_wsi.pipeline.segment`.
    gland_model, gland_weights
        A gland model for the squiggles (line annotations), if any image has some.
    bounds_offset : bool, optional
        Force QuPath's cropped frame (True) or the full frame (False) for every image.
    force : bool
        Redo images whose outputs are complete.
    log : callable, optional
        Receives one line per image as it is done.

    Raises
    ------
    ProjectError
        The project file itself cannot be read.
    ModelError
        The weights cannot be loaded (that concerns every image). Failures of single images are
        not raised: they are in the returned outcomes.
    """
    proj = project if isinstance(project, QuPathProject) else read_project(project)
    opts = options or SegmentOptions()
    if "qupath" not in opts.formats:
        opts = replace(opts, formats=("qupath", *opts.formats))
    say = log or (lambda line: None)
    models = _Models(model, weights, predictor, gland_model, gland_weights, opts)
    results = proj.results_dir
    if results.is_dir():
        cleanup_temporaries(results)
    by_file: dict[str, list[ProjectImage]] = {}
    for image in proj.images:
        by_file.setdefault(image.file_name.lower(), []).append(image)  # case-insensitive file systems

    outcomes: list[ImageOutcome] = []
    for image in proj.images:
        t0 = time.perf_counter()
        out = ImageOutcome(name=image.name, status="failed", clicks=proj.clicks_file(image))
        outcomes.append(out)
        try:
            image_opts = _prepare(proj, image, out, opts, by_file, force, bounds_offset)
            if image_opts is not None:
                _segment_one(image, out, image_opts, models, results)
        except ModelError as exc:
            if exc is models.load_error:
                raise  # the weights themselves are wrong: the same for every image
            out.message = _one_line(exc)
        except NuclickError as exc:
            out.message = _one_line(exc)
        except Exception as exc:  # noqa: BLE001 - one image's bug must not stop the others
            out.message = f"unexpected {type(exc).__name__}: {exc}"
            out.totals = {"traceback": traceback.format_exc(limit=8)}
        out.seconds = round(time.perf_counter() - t0, 3)
        say(f"{image.name}: {out.status}: {out.message}")
    run = ProjectRun(project=proj, images=outcomes)
    if any(o.status != "no clicks" for o in outcomes):
        run.summary_path = _write_summary(run)
    return run


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class _Models:
    """The models and predictor of a project run, loaded on first use."""

    def __init__(self, model, weights, predictor, gland_model, gland_weights, opts: SegmentOptions) -> None:
        self.model, self.weights, self.predictor = model, weights, predictor
        self.gland_model, self.gland_weights, self.opts = gland_model, gland_weights, opts
        self.load_error: ModelError | None = None

    def kwargs(self) -> dict[str, Any]:
        from .engine import Predictor
        from .models.weights import load_model

        try:
            if self.predictor is None:
                self.model = self.model or load_model(self.weights)
                self.predictor = Predictor(self.model, self.opts.device, self.opts.precision)
            if self.gland_model is None and self.gland_weights:
                self.gland_model = load_model(self.gland_weights, task="gland")
        except ModelError as exc:
            self.load_error = exc
            raise
        kw: dict[str, Any] = {"model": self.predictor.model, "predictor": self.predictor}
        if self.gland_model is not None:
            kw["gland_model"] = self.gland_model
        return kw


def _prepare(proj: QuPathProject, image: ProjectImage, out: ImageOutcome, opts: SegmentOptions,
             by_file: dict[str, list[ProjectImage]], force: bool, forced: bool | None) -> SegmentOptions | None:
    """The options for one image, or None when there is nothing to do (``out`` says why)."""
    if out.clicks is None:
        out.status = "no clicks"
        out.message = f"no {Path(*CLICKS_DIR, image.file_name + '.geojson')}"
        return None
    twins = by_file[image.file_name.lower()]
    if len(twins) > 1:
        others = ", ".join(f"#{t.index + 1}" for t in twins if t is not image)
        raise NuclickError(f"images #{image.index + 1} and {others} share the file name "
                           f"{image.file_name!r}; rename one in QuPath")
    if image.problem:
        raise NuclickError(image.problem)
    paths = output_paths(proj.results_dir, image.file_name, opts.formats, opts.gzip)
    if not force and _fresh(paths, out.clicks, opts.ngff):
        out.status, out.message = "complete", "results complete and newer than the clicks"
        out.outputs = {k: str(p) for k, p in paths.items()}
        return None
    image_opts, out.bounds = _image_options(image, opts, forced)
    return image_opts


def _segment_one(image: ProjectImage, out: ImageOutcome, opts: SegmentOptions, models: _Models,
                 results: Path) -> None:
    result = segment(image.path, out.clicks, results, options=opts, stem=image.file_name, **models.kwargs())
    out.status = "segmented"
    t = out.totals = result.report["totals"]
    out.outputs = {k: str(p) for k, p in result.outputs.items()}
    out.message = f"{t['segmented']} of {t['clicks']} clicks segmented"
    if t.get("skipped_by_reason"):
        out.message += " (" + ", ".join(f"{n} {r}" for r, n in t["skipped_by_reason"].items()) + ")"
    if "squiggles" in t:
        out.message += f"; {t.get('glands_segmented', 0)} of {t['squiggles']} squiggles (glands)"


def _image_options(image: ProjectImage, opts: SegmentOptions, forced: bool | None) -> tuple[SegmentOptions, str]:
    """Per-image options: the frame (bounds rule) and, if the file has none, the project's um/px."""
    if image.path is None or not image.path.exists():
        raise NuclickError(f"slide not found: {image.path or image.uri} (from {image.uri}); "
                           "moved? QuPath's 'Update URIs' or a project beside its images helps")
    with open_slide(image.path, bounds_offset=True, reader=opts.reader, mpp=opts.mpp) as src:
        cropped, offset, file_mpp = (src.width, src.height), tuple(src.bounds_offset), src.mpp
    full = cropped
    if offset != (0, 0):
        with open_slide(image.path, bounds_offset=False, reader=opts.reader, mpp=opts.mpp) as src:
            full = (src.width, src.height)
    _check_size(image, cropped, full)
    if forced is None:
        use, why = bounds_rule(image, cropped, full, offset)
    else:
        use, why = forced, f"{'--bounds-offset' if forced else '--no-bounds-offset'} given"
    mpp = opts.mpp
    if mpp is None and file_mpp is None and image.mpp is not None:
        mpp = image.mpp
        why += f"; um/px {mpp:g} from the QuPath project"
    return replace(opts, bounds_offset=use, mpp=mpp), why


def _write_summary(run: ProjectRun) -> Path:
    path = run.project.results_dir / "summary.json"
    doc = {
        "project": str(run.project.file),
        "qupath_version": run.project.version,
        "counts": run.counts(),
        "images": [
            {"name": o.name, "status": o.status, "message": o.message, "frame": o.bounds,
             "clicks": None if o.clicks is None else str(o.clicks), "outputs": o.outputs,
             "totals": o.totals, "seconds": o.seconds}
            for o in run.images
        ],
    }
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except NuclickError:
        return None  # type: ignore[return-value]  # results folder not writable: the images said so
    return path
