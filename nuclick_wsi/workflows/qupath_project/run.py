"""Segmenting the exported clicks of every image of a QuPath project, one image after another."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nuclick_wsi.workflows.qupath_project.project import CLICKS_DIR, ProjectImage, QuPathProject, check_size, bounds_rule, read_project
from nuclick_wsi._util.fs import atomic_output, cleanup_temporaries
from nuclick_wsi._util.text import first_line
from nuclick_wsi.errors import ModelError, NuclickError
from nuclick_wsi.io.annotations.qupath_writer import FeatureMemory
from nuclick_wsi.model.models import Models
from nuclick_wsi.outputs.paths import output_paths, outputs_fresh
from nuclick_wsi.pipeline import SegmentOptions, segment
from nuclick_wsi.qc import index_row, qc_paths, refuse_foreign_index, write_index
from nuclick_wsi.workflows.redo import redo_reason
from nuclick_wsi.io.slides.registry import open_slide


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
    redone: str | None = None  #: why results that were complete were redone ("model weights changed")


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


def run_project(project: QuPathProject | str | os.PathLike, *, options: SegmentOptions | None = None,
                models: Models | None = None, bounds_offset: bool | None = None, force: bool = False,
                redo: Collection[str] = (), log: Callable[[str], None] | None = None,
                memory: FeatureMemory | None = None) -> ProjectRun:
    """Segment the exported clicks of every image of a QuPath project.

    For each image with ``PROJECT/nuclick/clicks/<name>.geojson``: resolve its slide from the
    project's URI, choose the frame (:func:`bounds_rule`, unless ``bounds_offset`` is given),
    segment, and write ``PROJECT/nuclick/results/<name>.geojson`` with ``<name>.labels.zarr`` and
    ``<name>.report.json`` beside it. Images whose outputs are complete, newer than their clicks
    and made with the same options (model, thresholds, object type, formats, frame, um/px...; not
    device or batch size: :mod:`nuclick_wsi.workflows.redo`) are skipped (``force`` and
    ``options.full`` redo them); an image that fails is reported and the others go
    on. Models are loaded once, when the first image needs them. A summary is written to
    ``PROJECT/nuclick/results/summary.json``.

    Parameters
    ----------
    project : QuPathProject or path
        The project (file or folder).
    options : SegmentOptions, optional
        Options for every image; ``bounds_offset`` in it is ignored (see ``bounds_offset``), and
        ``mpp`` falls back to the project's pixel size for slides whose files have none.
    models : Models, optional
        The nucleus model and a gland model for the squiggles (line annotations), if any image has
        some, as for :func:`~nuclick_wsi.pipeline.segment`; loaded once, when first needed.
    bounds_offset : bool, optional
        Force QuPath's cropped frame (True) or the full frame (False) for every image.
    force : bool
        Redo images whose outputs are complete.
    redo : collection of str
        Clicks files (paths as str) whose images are redone even when their outputs look complete
        (``--watch``: exported again while a pass ran, so older than the results they are newer than).
    log : callable, optional
        Receives one line per image as it is done.
    memory : FeatureMemory, optional
        A watching process's memory of the GeoJSON it wrote (see :func:`~nuclick_wsi.pipeline.segment`).

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
    models = models or Models()
    results = proj.results_dir
    if opts.qc:
        refuse_foreign_index(results)  # before any work: a user's own results/index.html stays
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
            image_opts = _prepare(proj, image, out, opts, models, by_file,
                                  force or (out.clicks is not None and str(out.clicks) in redo), bounds_offset)
            if image_opts is not None:
                _segment_one(image, out, image_opts, models, results, memory)
        except ModelError as exc:
            if models.is_load_error(exc):
                raise  # the weights themselves are wrong: the same for every image
            out.message = first_line(exc)
        except NuclickError as exc:
            out.message = first_line(exc)
        except Exception as exc:  # noqa: BLE001 - one image's bug must not stop the others
            out.message = f"unexpected {type(exc).__name__}: {exc}"
            out.totals = {"traceback": traceback.format_exc(limit=8)}
        out.seconds = round(time.perf_counter() - t0, 3)
        say(f"{image.name}: {out.status}: {out.message}")
    run = ProjectRun(project=proj, images=outcomes)
    if any(o.status != "no clicks" for o in outcomes):
        run.summary_path = _write_summary(run)
        if opts.qc:  # results/index.html: one row per image, linking each <image>.qc.html
            write_index(results, [index_row(results, img.file_name, o.status, seconds=o.seconds, error=o.message)
                                  for img, o in zip(proj.images, outcomes) if o.status != "no clicks"])
    return run


def _prepare(proj: QuPathProject, image: ProjectImage, out: ImageOutcome, opts: SegmentOptions, models: Models,
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
    fresh = not force and outputs_fresh(paths, [out.clicks], opts.ngff, clicks=out.clicks)
    if fresh and (image.path is None or not image.path.exists()):  # cannot be redone: done, as before
        return _complete(out, paths)
    image_opts, out.bounds = _image_options(image, opts, forced)
    if not force and paths["report"].exists():  # (also said when outputs are missing because the formats changed)
        # done unless asked for something else (the slide opened above: its frame and um/px are asked too)
        out.redone = redo_reason(paths["report"], image_opts, models, qc_paths(proj.results_dir, image.file_name).values())
        if fresh and out.redone is None:
            return _complete(out, paths)
    return image_opts


def _complete(out: ImageOutcome, paths: dict[str, Path]) -> None:
    out.status, out.message = "complete", "results complete, newer than the clicks and made with the same options"
    out.outputs = {k: str(p) for k, p in paths.items()}


def _segment_one(image: ProjectImage, out: ImageOutcome, opts: SegmentOptions, models: Models,
                 results: Path, memory: FeatureMemory | None = None) -> None:
    result = segment(image.path, out.clicks, results, options=opts, stem=image.file_name, models=models,
                     memory=memory)
    out.status = "segmented"
    t = out.totals = result.report["totals"]
    out.outputs = {k: str(p) for k, p in result.outputs.items()}
    out.message = f"{'redone: ' + out.redone + '; ' if out.redone else ''}{t['segmented']} of {t['clicks']} clicks segmented"
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
    check_size(image, cropped, full)
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
