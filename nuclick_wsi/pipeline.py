"""``segment``: prompts on a slide -> instance polygons, zarr label stores and a report.

The typed entry point the CLI, the batch runner and notebooks call::

    from nuclick_wsi.pipeline import segment, SegmentOptions
    result = segment("slide.svs", "clicks.geojson", "out/")

Stages: prepare (read the prompts, pick the models, open the slide, check the prompts) -> run (one
:class:`~nuclick_wsi.engine.run.PromptRun` per kind of prompt) -> store -> export (polygons, report,
committed atomically).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nuclick_wsi._util.fs import cleanup_temporaries, ensure_writable_dir, remove_path, temp_path_for
from nuclick_wsi.engine.background import Timer
from nuclick_wsi.engine.clicks import ClickStrategy
from nuclick_wsi.engine.rerun import decide, fingerprint, read_previous, report_section
from nuclick_wsi.engine.run import PromptRun
from nuclick_wsi.engine.squiggles import CONTEXT, SquiggleStrategy
from nuclick_wsi.errors import ModelError, NuclickError
from nuclick_wsi.guidance.clicks import check_clicks, roi_reasons
from nuclick_wsi.guidance.squiggles import check_squiggles
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.io.slides.registry import open_slide
from nuclick_wsi.io.slides.resolution import require_mpp
from nuclick_wsi.model.models import Models
from nuclick_wsi.model.predictor import Predictor
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.outputs.asked import asked_section
from nuclick_wsi.outputs.commit import commit_outputs, write_polygons
from nuclick_wsi.io.annotations.qupath import OBJECT_TYPES
from nuclick_wsi.io.annotations.qupath_writer import FeatureMemory
from nuclick_wsi.outputs import safety
from nuclick_wsi.outputs.paths import file_sha256, output_paths, slide_stem
from nuclick_wsi.outputs.report import segment_report
from nuclick_wsi.postprocess.threshold import PostParams
from nuclick_wsi.qc import qc_paths, write_qc
from nuclick_wsi.records import Instance, Prompts
from nuclick_wsi.store.chunks import EarlierStore
from nuclick_wsi.store.labels import LabelStore
from nuclick_wsi.store.rerun import RerunState, write_state

log = logging.getLogger("nuclick_wsi")

__all__ = ["Models", "SegmentOptions", "SegmentResult", "predict_gland_labels", "predict_labels", "segment"]


@dataclass
class SegmentOptions:
    """Options of ``segment`` (the CLI flags of the same names; thresholds belong to the models)."""

    formats: Sequence[str] = ("qupath",)
    object_type: str = "detection"
    mpp: float | None = None
    bounds_offset: bool = True
    reader: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False  #: test-time augmentation: mean over 4 flips of each patch (4x the network's work)
    runtime: str = "auto"  #: CPU inference runtime: "auto" (measured), "torch" or "openvino"
    batch_size: int = 64
    duplicate_px: float = 2.0
    chunk: int = 1024
    ngff: str = "0.4"  #: label stores: "0.4" (zarr v2, QuPath 0.6 reads it) or "0.5" (zarr v3)
    gzip: bool = False
    progress: bool = True
    roi: bool = False  #: skip clicks outside the file's area annotations ("outside the ROI")
    squiggle_groups: Sequence[str] = ()  #: ASAP groups / ImageScope layers whose outlines are squiggles
    qc: bool = False  #: also write S.qc.html and S.review.geojson (the CLI's default; see nuclick_wsi.qc)
    full: bool = False  #: a fresh id table and every click recomputed, whatever the folder holds (--full)
    #: every click recomputed, the folder's id table kept: the from-scratch run an incremental one must equal
    recompute: bool = False


@dataclass
class SegmentResult:
    """What ``segment`` wrote and the report it wrote."""

    outputs: dict[str, Path]
    report: dict[str, Any]
    skipped: bool = False  #: True when complete outputs were already there


def post_params(model: LoadedModel) -> PostParams:
    """A model's post-processing thresholds (model pixels), from its metadata."""
    pp = model.postprocess
    return PostParams(float(pp["threshold"]), float(pp["min_object_px"]), float(pp["min_hole_px"]))


def click_run(slide: SlideSource, prompts: Prompts, model: LoadedModel, predictor: Predictor, mpp: float,
              stem: str, opts: SegmentOptions, reasons: list[str | None], timer: Timer | None = None, *,
              ids: tuple[list[int], list[str]] | None = None, cache: dict | None = None,
              outlines: dict[str, bytes] | None = None, finals: dict[str, tuple] | None = None,
              contents: dict[str, str] | None = None) -> PromptRun:
    """``ids``: label ids and uuids per click (default: index + 1); ``cache``, ``outlines``, ``finals``,
    ``contents``: an earlier run's pieces, traced outlines, final instances and content keys."""
    labels, uuids = ids or (None, None)
    strategy = ClickStrategy(slide, prompts, model.mpp, model.patch_size, mpp, batch_size=opts.batch_size,
                             duplicate_px=opts.duplicate_px, labels=labels, uuids=uuids, cache=cache, stem=stem,
                             contents=contents)
    return PromptRun(strategy, predictor, post_params(model), mpp, timer=timer, outlines=outlines, finals=finals,
                     reasons={k: r for k, r in enumerate(reasons) if r is not None})


def squiggle_run(slide: SlideSource, prompts: Prompts, model: LoadedModel, predictor: Predictor, mpp: float,
                 stem: str, reasons: list[str | None], *, first_label: int, timer: Timer | None = None,
                 context: float = CONTEXT) -> PromptRun:
    strategy = SquiggleStrategy(slide, prompts, model.mpp, model.patch_size, mpp, first_label=first_label,
                                context=context, stem=stem)
    return PromptRun(strategy, predictor, post_params(model), mpp, timer=timer,
                     reasons={k: r for k, r in enumerate(reasons) if r is not None})


def predict_labels(slide: SlideSource, prompts: Prompts, model: LoadedModel, *, predictor: Predictor | None = None,
                   options: SegmentOptions | None = None, mpp: float | None = None, stem: str = "array"
                   ) -> tuple[np.ndarray, list[Instance], dict[int, str]]:
    """Segment the clicks of ``prompts`` on a small slide, in memory (no files).

    Returns the label image (ids = click index + 1), the instances and, per click index, the reason a
    click gave no instance. Runs exactly the code path of :func:`segment`.
    """
    opts = options or SegmentOptions(progress=False)
    mpp = mpp if mpp is not None else require_mpp(slide)
    predictor = predictor or Predictor(model, opts.device, opts.precision, opts.tta, opts.runtime)
    run = click_run(slide, prompts, model, predictor, mpp, stem, opts, check_clicks(prompts, slide, opts.duplicate_px))
    return run.in_memory(opts.chunk)


def predict_gland_labels(slide: SlideSource, prompts: Prompts, model: LoadedModel, *, mpp: float | None = None,
                         predictor: Predictor | None = None, first_label: int = 1, device: str = "auto",
                         precision: str = "auto", chunk: int = 1024, stem: str = "array", context: float = CONTEXT
                         ) -> tuple[np.ndarray, list[Instance], dict[int, str]]:
    """Segment the squiggles of ``prompts`` on a small slide, in memory (no files).

    Returns the label image (ids = ``first_label`` + squiggle index), the instances and, per
    squiggle index, the reason it gave no instance. Runs the code path of :func:`segment`.
    """
    if model.task != "gland":
        raise ModelError(f"{model.source}: a {model.task} model, not a gland model")
    mpp = mpp if mpp is not None else require_mpp(slide)
    predictor = predictor or Predictor(model, device, precision)
    run = squiggle_run(slide, prompts, model, predictor, mpp, stem, check_squiggles(prompts, slide),
                       first_label=first_label, context=context)
    return run.in_memory(chunk)


def check_prompts(prompts: Prompts, slide: SlideSource, points_path, opts: SegmentOptions,
                  precedence: list[int] | None = None) -> tuple[list[str | None], list[str | None]]:
    """Per click and per squiggle: None when it is to be segmented, else why not (of two duplicate
    clicks, the one first in ``precedence``, their label ids, is kept).

    Raises
    ------
    NuclickError
        Every prompt lies off the slide (wrong slide, or another frame); ``--roi`` problems.
    """
    reasons = check_clicks(prompts, slide, opts.duplicate_px, precedence)
    sq_reasons = check_squiggles(prompts, slide)
    if all(r is not None and r.startswith("outside") for r in reasons + sq_reasons):
        raise NuclickError(
            f"{points_path}: none of its {len(reasons)} clicks"
            f"{f' and {len(sq_reasons)} squiggles' if sq_reasons else ''} lies on {slide.path} ({slide.width} x {slide.height} px"
            f"{', bounds offset ' + str(slide.bounds_offset) if any(slide.bounds_offset) else ''}); "
            "wrong slide, or clicks in another frame (see --no-bounds-offset)?")
    if opts.roi:
        reasons = roi_reasons(prompts, reasons, points_path)
    return reasons, sq_reasons


def segment(slide_path: str | os.PathLike, points_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            options: SegmentOptions | None = None, models: Models | None = None,
            stem: str | None = None, memory: FeatureMemory | None = None) -> SegmentResult:
    """Segment every prompt of ``points_path`` on ``slide_path``; write outputs into ``out_dir``.

    Outputs (``S`` = the slide's stem, or ``stem``): ``S.geojson`` (QuPath), ``S.xml`` (ASAP),
    ``S.parquet`` (GeoParquet) as chosen by ``options.formats``, ``S.labels.zarr`` and
    ``S.report.json``. Each is written under a temporary name and renamed when everything is done;
    on any error nothing is left in ``out_dir``.

    Clicks are nuclei (``models.nuclei``, the embedded default unless given). Squiggles (lines) are
    glands, segmented in the same run with ``models.gland`` into ``S.glands.zarr``; their ids
    continue after the clicks' (squiggle k: the id table's next free click id + k; glands keep no ids
    of their own across reruns, their uuids follow the squiggle's index and first point).

    Reruns (:mod:`nuclick_wsi.engine.rerun`): a click's id and uuid follow the click across reruns
    into the same folder (the id table in ``S.labels.zarr``); when the folder holds a complete run
    with the same slide, model, um/px and options, only the clicks whose patch an edit touched are
    recomputed, and the outputs are those a from-scratch run with the same id table writes.
    ``options.full`` starts afresh. ``memory``: what a watching process remembers of the GeoJSON it
    wrote (unchanged outlines are not formatted again; the same bytes).

    Raises
    ------
    NuclickError
        Bad slide, annotation file, resolution, weights or output folder (one-line message).
    """
    opts, models = options or SegmentOptions(), models or Models()
    if opts.object_type not in OBJECT_TYPES:
        raise NuclickError(f"unknown object type {opts.object_type!r} (choose from {', '.join(OBJECT_TYPES)})")
    t_start = time.perf_counter()
    stem = safety.check_stem(stem or slide_stem(slide_path))
    output_paths(out_dir, stem, opts.formats, opts.gzip)  # an unknown format fails before any work
    points_sha = file_sha256(points_path)  # before reading: a file saved again meanwhile reads as changed
    prompts = read_prompts(points_path, squiggle_groups=opts.squiggle_groups or None)
    nuclei_model, gland_model = models.for_prompts(prompts, str(points_path))
    paths = output_paths(out_dir, stem, opts.formats, opts.gzip, glands=gland_model is not None)
    stale = safety.stale_outputs(paths["report"], paths.values())  # only what an earlier run wrote
    qc, writes_qc = qc_paths(out_dir, stem), opts.qc and "qupath" in paths  # the QC page reads the GeoJSON
    safety.refuse_overlap({"slide": slide_path, "clicks file": points_path,  # weights given or loaded (batch)
                           "weights": safety.local_file(getattr(nuclei_model, "source", None)),
                           "gland weights": safety.local_file(getattr(gland_model, "source", None))},
                          [*paths.values(), *stale, *qc.values()])  # written or removed
    ours = safety.refuse_foreign(paths, qc.values())  # a user's own S.xml, S.geojson, ...
    if not writes_qc:  # an earlier QC page goes with the commit (it shows other outlines)
        stale += [p for p in qc.values() if p.name in ours and os.path.lexists(p)]
    slide = open_slide(slide_path, mpp=opts.mpp, bounds_offset=opts.bounds_offset, reader=opts.reader)
    try:
        mpp = require_mpp(slide)
        previous = read_previous(paths["report"], paths["labels"], full=opts.full)
        other = previous.another_slide(slide_path)
        if other is not None:
            log.warning("%s: replacing the outputs of another slide of the same name, %s (give --stem or "
                        "another -o to keep both)", paths["report"].parent / stem, other)
        labels, uuids, table = previous.table.assign(prompts.clicks, stem)
        reasons, sq_reasons = check_prompts(prompts, slide, points_path, opts, labels)
        ensure_writable_dir(Path(out_dir))
        cleanup_temporaries(out_dir)  # temporaries of killed runs (their owner is gone)
        safety.check_free_space(Path(out_dir), safety.expected_bytes(len(reasons) + len(sq_reasons), opts.formats,
                                                                   chunks_touched(prompts, opts.chunk),
                                                                   qc=writes_qc))
        timer = Timer()
        nuclei = gland = rerun = None
        if nuclei_model is not None:
            pred = models.predictor(nuclei_model, opts.device, opts.precision, opts.tta, opts.runtime)
            rerun = decide(previous, fingerprint(slide, slide_path, mpp, nuclei_model, pred, opts.batch_size),
                           recompute=opts.recompute)
            nuclei = (nuclei_model, click_run(slide, prompts, nuclei_model, pred, mpp, stem, opts, reasons, timer,
                                              ids=(labels, uuids), cache=rerun.cache, outlines=rerun.outlines,
                                              finals=rerun.finals, contents=rerun.contents))
        if gland_model is not None:
            pred = models.predictor(gland_model, opts.device, opts.precision, opts.tta, opts.runtime)
            gland = (gland_model, squiggle_run(slide, prompts, gland_model, pred, mpp, stem, sq_reasons,
                                               first_label=table.next_id, timer=timer))
        report = _run_and_write(slide, prompts, nuclei, gland, paths, stale, stem, mpp, opts, timer,
                                dict(slide_path=slide_path, points_path=points_path, points_sha=points_sha, t_start=t_start,
                                     rerun=rerun, table=table, memory=memory,
                                     others=_still_ours(paths, stale, ours, qc, writes_qc)))
    finally:
        slide.close()
    if writes_qc:  # the QC report reads the outputs just written
        try:
            write_qc(out_dir, stem)
        except BaseException as exc:  # also Ctrl-C / SIGTERM while the page is written
            _remove_qc(out_dir, stem)
            full = safety.disk_full(exc, out_dir)
            if full is None:
                raise
            raise full from exc
    else:
        _remove_qc(out_dir, stem)
    return SegmentResult(outputs=paths, report=report)


def _still_ours(paths: dict[str, Path], stale: list[Path], ours: set[str], qc: dict[str, Path],
                writes_qc: bool) -> list[Path]:
    """Files besides this run's outputs that the commit marker names as ours: the QC page and review list
    (``qc``) when QC runs, and earlier outputs of ours kept because they were edited since (a dropped
    format's file changed by hand: still ours when a later run writes that format again)."""
    folder = paths["report"].parent
    gone = {p.name for p in [*paths.values(), *stale, *qc.values()]}
    kept = [folder / n for n in sorted(ours - gone) if os.path.lexists(folder / n)]
    return [*(qc.values() if writes_qc else ()), *kept]


def _remove_qc(out_dir, stem: str) -> None:
    """Remove an earlier run's QC page and review list: they would show other outlines."""
    for stale in qc_paths(out_dir, stem).values():
        remove_path(stale)


def chunks_touched(prompts: Prompts, chunk: int) -> int:
    """Label-store chunks that may hold an instance (one per distinct chunk of a click, 4 per squiggle)."""
    cells = {(math.floor(c.x / chunk), math.floor(c.y / chunk)) for c in prompts.clicks
             if math.isfinite(c.x) and math.isfinite(c.y)}
    return len(cells) + 4 * len(prompts.squiggles)


def _run_and_write(slide, prompts, nuclei, gland, paths, stale: list[Path], stem: str, mpp: float,
                   opts: SegmentOptions, timer: Timer, where: dict[str, Any]) -> dict[str, Any]:
    """Run each kind of prompt into its label store, write the polygons and the report, commit.

    ``stale``: outputs an earlier run wrote that this one does not (removed once it is committed).
    """
    temps = {k: temp_path_for(p) for k, p in paths.items()}

    def store(key: str, name: str, earlier: EarlierStore | None = None):
        return lambda: LabelStore.create(temps[key], slide.width, slide.height, chunk=opts.chunk, name=name, mpp=mpp,
                                         ngff_version=opts.ngff, earlier=earlier)

    try:
        state_sha = None
        if nuclei is not None:
            rerun = where["rerun"]  # an incremental rerun copies the unchanged chunks of the earlier store
            earlier = None if rerun.chunks is None else EarlierStore(paths["labels"], rerun.chunks)
            labels = nuclei[1].into_store(store("labels", "nuclei", earlier), progress=opts.progress, desc=stem,
                                          unit="nuclei")
            t = time.perf_counter()
            state = RerunState(rerun.fingerprint, where["table"].to_json(), nuclei[1].strategy.pieces,
                               nuclei[1].outlines, labels.chunk_table, nuclei[1].finals,
                               nuclei[1].strategy.contents)
            state_sha = write_state(temps["labels"], state)
            timer.add("write", time.perf_counter() - t)
        else:  # squiggles only: an empty nucleus label store
            store("labels", "nuclei")().finalize([], colors=None)
        if gland is not None:
            gland[1].into_store(store("glands", "glands"), progress=opts.progress, desc=f"{stem} glands",
                                unit="glands")
        t = time.perf_counter()
        instances = (nuclei[1].instances if nuclei else []) + (gland[1].instances if gland else [])
        memory = where["memory"]
        write_polygons(instances, temps, object_type=opts.object_type, gzip=opts.gzip, mpp=mpp,
                       memo=memory.of(paths["qupath"]) if memory is not None and "qupath" in paths else None)
        timer.add("write", time.perf_counter() - t)
        predictor = (nuclei or gland)[1].predictor
        report = segment_report(slide=slide, prompts=prompts, slide_path=where["slide_path"],
                                points_path=where["points_path"], points_sha=where["points_sha"], mpp=mpp, nuclei=nuclei, gland=gland,
                                asked=asked_section(opts, nuclei and nuclei[0], gland and gland[0]),
                                predictor=predictor, paths=paths, timer=timer,
                                wall=time.perf_counter() - where["t_start"])
        if nuclei is not None:
            report["rerun"] = report_section(where["rerun"], where["table"], nuclei[1], state_sha, labels)
        commit_outputs(temps, paths, report, stale=stale, others=where["others"])
    except BaseException as exc:
        for tmp in temps.values():
            remove_path(tmp)
        full = safety.disk_full(exc, paths["report"].parent)
        if full is not None:
            raise full from exc
        raise
    return report
