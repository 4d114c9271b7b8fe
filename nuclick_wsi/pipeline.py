"""``segment``: clicks on a slide -> instance polygons, a zarr label store and a report.

The typed entry point the CLI, the batch runner and notebooks call::

    from nuclick_wsi.pipeline import segment, SegmentOptions
    result = segment("slide.svs", "clicks.geojson", "out/")
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace as replace_fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from . import __version__
from .annotations import read_prompts, write_asap, write_geoparquet, write_qupath
from .atomic import _remove, atomic_output, ensure_writable_dir, replace, temp_path_for
from .engine import Predictor, Timer, background
from .errors import NuclickError
from .export import deterministic_uuid, trace_mask
from .glands import GlandRun, add_to_report, check_squiggles, resolve_models
from .guidance import ExclusionIndex, Region, effective_scale, patch_origin, plan_regions
from .models.weights import LoadedModel
from .postprocess import PostParams, instance_from_probability
from .records import Instance, Prompts, outcome
from .slide import SlideSource, open_slide, require_mpp
from .stitch import Piece, Stitcher
from .store import LabelStore, is_complete

FORMATS = {"qupath": ".geojson", "asap": ".xml", "geoparquet": ".parquet"}
OBJECT_TYPES = ("detection", "annotation", "cell")


@dataclass
class SegmentOptions:
    """Options of ``segment`` (the CLI flags of the same names)."""

    formats: Sequence[str] = ("qupath",)
    object_type: str = "detection"
    mpp: float | None = None
    bounds_offset: bool = True
    reader: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    threshold: float | None = None
    min_object_px: float | None = None  #: at the model's resolution
    min_hole_px: float | None = None
    duplicate_px: float = 2.0
    chunk: int = 1024
    ngff: str = "0.4"  #: label stores: "0.4" (zarr v2, QuPath 0.6 reads it) or "0.5" (zarr v3)
    gzip: bool = False
    progress: bool = True
    roi: bool = False  #: skip clicks outside the file's area annotations ("outside the ROI")
    task: str = "nuclei"  #: what ``weights``/``model`` (and the threshold overrides) are for: "nuclei" or "gland"
    squiggle_groups: Sequence[str] = ()  #: ASAP groups / ImageScope layers whose outlines are squiggles


@dataclass
class SegmentResult:
    """What ``segment`` wrote and the report it wrote."""

    outputs: dict[str, Path]
    report: dict[str, Any]
    skipped: bool = False  #: True when complete outputs were already there


def output_paths(out_dir: str | os.PathLike, stem: str, formats: Sequence[str], gzip: bool = False, *,
                 glands: bool = False) -> dict[str, Path]:
    """Final output paths for a slide stem (``glands``: with ``S.glands.zarr``, for files with squiggles)."""
    out = Path(out_dir)
    paths = {"labels": out / f"{stem}.labels.zarr", "report": out / f"{stem}.report.json"}
    if glands:
        paths["glands"] = out / f"{stem}.glands.zarr"
    for f in formats:
        if f not in FORMATS:
            raise NuclickError(f"unknown output format {f!r} (choose from {', '.join(FORMATS)})")
        paths[f] = out / f"{stem}{FORMATS[f]}{'.gz' if gzip and f == 'qupath' else ''}"
    return paths


def outputs_complete(paths: dict[str, Path], ngff: str | None = None) -> bool:
    """True when every output exists and the label store is complete (the report is written last);
    with ``ngff``, only label stores of that NGFF version count."""
    return (all(p.exists() for p in paths.values()) and is_complete(paths["labels"], ngff)
            and ("glands" not in paths or is_complete(paths["glands"], ngff)))


def slide_stem(path: str | os.PathLike) -> str:
    """The slide's name without its extension(s) (``a.ome.tiff`` -> ``a``)."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _post_params(model: LoadedModel, opts: SegmentOptions) -> PostParams:
    pp = model.postprocess
    return PostParams(
        threshold=opts.threshold if opts.threshold is not None else float(pp["threshold"]),
        min_object_px=opts.min_object_px if opts.min_object_px is not None else float(pp["min_object_px"]),
        min_hole_px=opts.min_hole_px if opts.min_hole_px is not None else float(pp["min_hole_px"]),
    )


def check_clicks(prompts: Prompts, slide: SlideSource, duplicate_px: float) -> list[str | None]:
    """Per click: None when it is to be segmented, else the reason it is not."""
    n = len(prompts.clicks)
    xs = np.array([c.x for c in prompts.clicks], float)
    ys = np.array([c.y for c in prompts.clicks], float)
    reasons: list[str | None] = [None] * n
    outside = (xs < 0) | (ys < 0) | (xs >= slide.width) | (ys >= slide.height) | ~np.isfinite(xs) | ~np.isfinite(ys)
    for k in np.flatnonzero(outside):
        reasons[k] = f"outside the slide ({slide.width} x {slide.height} px)"
    inside = np.flatnonzero(~outside)
    if len(inside) > 1 and duplicate_px > 0:
        tree = cKDTree(np.stack([xs[inside], ys[inside]], axis=1))
        for i, j in sorted(tree.query_pairs(duplicate_px)):
            a, b = inside[i], inside[j]
            if reasons[a] is None and reasons[b] is None:
                # "duplicate (...)": the report groups skipped clicks by the text before " ("
                reasons[b] = f"duplicate (of click {a}, within {duplicate_px:g} px)"
    return reasons


def roi_reasons(prompts: Prompts, reasons: list[str | None], points_path) -> list[str | None]:
    """``--roi``: clicks outside every region (area annotation) of the file get "outside the ROI".

    A click on a region's edge is inside. A file without regions is an error, and so is a file
    whose clicks all lie outside its regions.
    """
    from shapely import make_valid, points as _points, union_all
    from shapely.prepared import prep

    if not prompts.regions:
        raise NuclickError(f"{points_path}: --roi, but the file has no area annotations (polygons) to limit the work to")
    area = prep(union_all([make_valid(g) for g in prompts.regions]))  # hand-drawn outlines may self-intersect
    pts = _points([(c.x, c.y) for c in prompts.clicks])
    out = list(reasons)
    for k, p in enumerate(pts):
        if out[k] is None and not area.covers(p):
            out[k] = f"outside the ROI ({len(prompts.regions)} area annotation(s))"
    if all(r is not None for r in out) and any(r is None for r in reasons):
        raise NuclickError(f"{points_path}: --roi: none of its clicks lies inside its {len(prompts.regions)} "
                           "area annotation(s)")
    return out


class _Run:
    """State of one segmentation run (one slide)."""

    def __init__(self, slide: SlideSource, prompts: Prompts, model: LoadedModel, predictor: Predictor,
                 opts: SegmentOptions, stem: str, mpp: float) -> None:
        self.slide, self.prompts, self.model, self.predictor = slide, prompts, model, predictor
        self.opts, self.stem, self.mpp = opts, stem, mpp
        self.scale = effective_scale(model.mpp, mpp)
        self.patch = model.patch_size
        self.params = _post_params(model, opts).scaled(self.scale ** 2)
        self.timer = Timer()
        self.instances: list[Instance] = []
        self.table: list[dict[str, Any]] = []
        self.reasons: dict[int, str] = {}

    # --- producer side (background thread) ------------------------------------------------------
    def batches(self, regions: list[Region], xs: np.ndarray, ys: np.ndarray, ids: np.ndarray):
        p, half, bs = self.patch, self.patch // 2, self.opts.batch_size
        excl = ExclusionIndex(xs, ys, self.scale)
        buf = np.zeros((bs, 5, p, p), np.float32)
        meta: list[tuple[int, int, float, float]] = []
        for region in regions:
            t = time.perf_counter()
            img = self.slide.read_region(region.x0, region.y0, region.width * self.scale, region.height * self.scale,
                                         region.width, region.height)
            self.timer.add("read", time.perf_counter() - t)
            t = time.perf_counter()
            for k in region.clicks:
                c0, r0 = patch_origin(xs[k], ys[k], region, self.scale, p)
                n = len(meta)
                np.multiply(img[r0:r0 + p, c0:c0 + p].transpose(2, 0, 1), np.float32(1 / 255), out=buf[n, :3])
                buf[n, 3], buf[n, 4] = excl.maps(int(k), p)
                gx, gy = math.floor(xs[k] / self.scale), math.floor(ys[k] / self.scale)
                meta.append((int(ids[k]), region.row, (gx - half) * self.scale, (gy - half) * self.scale))
                if len(meta) == bs:
                    self.timer.add("read", time.perf_counter() - t)
                    yield buf.copy(), meta
                    t = time.perf_counter()
                    meta = []
            self.timer.add("read", time.perf_counter() - t)
        if meta:
            yield buf[: len(meta)].copy(), meta

    # --- consumer side ---------------------------------------------------------------------------
    def piece(self, prob: np.ndarray, idx: int, px0: float, py0: float) -> Piece | None:
        click = self.prompts.clicks[idx]
        cx, cy = math.floor(click.x), math.floor(click.y)
        if self.scale == 1.0:
            u0, v0 = int(round(px0)), int(round(py0))
            grid = prob
        else:
            size = self.patch * self.scale
            u0, v0 = math.floor(px0), math.floor(py0)
            w, h = math.ceil(px0 + size) - u0, math.ceil(py0 + size) - v0
            off = [(v0 + 0.5 - py0) / self.scale - 0.5, (u0 + 0.5 - px0) / self.scale - 0.5]
            grid = ndi.affine_transform(prob, [1 / self.scale, 1 / self.scale], offset=off, output_shape=(h, w),
                                        order=1, mode="nearest")
        seed = (cy - v0, cx - u0)
        mask, where = instance_from_probability(grid, seed, self.params)
        if mask is None:
            self.reasons[idx] = where
            return None
        r0, c0 = where
        h, w = mask.shape
        seed_mask = np.zeros_like(mask)
        seed_mask[seed[0] - r0, seed[1] - c0] = True
        return Piece(label=idx + 1, x0=u0 + c0, y0=v0 + r0, mask=mask, prob=grid[r0:r0 + h, c0:c0 + w].astype(np.float16),
                     seed=seed_mask, meta={"index": idx})

    def retire(self, piece: Piece) -> None:
        t = time.perf_counter()
        idx = piece.meta["index"]
        click = self.prompts.clicks[idx]
        area = float(piece.mask.sum())
        score = float(piece.prob[piece.mask].astype(np.float32).mean())
        rr, cc = np.nonzero(piece.mask)
        cxm, cym = piece.x0 + cc.mean() + 0.5, piece.y0 + rr.mean() + 0.5
        geom = trace_mask(piece.mask, piece.x0, piece.y0)
        area_um2 = area * self.mpp ** 2
        uid = deterministic_uuid(self.stem, idx, click.x, click.y, "nucleus")
        self.instances.append(Instance(label=piece.label, uuid=uid, geometry=geom, class_name=click.class_name,
                                       color=click.color, area_px=area, area_um2=area_um2, score=score,
                                       prompt_index=idx, kind="nucleus"))
        self.table.append({"label": piece.label, "prompt_index": idx, "class_name": click.class_name,
                           "x": click.x, "y": click.y, "centroid_x": round(cxm, 3), "centroid_y": round(cym, 3),
                           "area_px": area, "area_um2": area_um2, "score": round(score, 6), "kind": "nucleus"})
        self.timer.add("write", time.perf_counter() - t)

    def run(self, store: LabelStore, progress) -> None:
        valid = [k for k, c in enumerate(self.prompts.clicks) if k not in self.reasons]
        if self.opts.duplicate_px > 0 and self.scale > 1:
            # a model pixel wider than duplicate_px can hold two clicks that are not duplicates in
            # level-0 px: both would get the same patch and the later one a 1 px instance
            seen: dict[tuple[int, int], int] = {}
            for k in valid:
                c = self.prompts.clicks[k]
                key = (math.floor(c.x / self.scale), math.floor(c.y / self.scale))
                if key in seen:
                    self.reasons[k] = f"duplicate (of click {seen[key]}, in the same model pixel)"
                else:
                    seen[key] = k
            valid = [k for k in valid if k not in self.reasons]
        xs = np.array([self.prompts.clicks[k].x for k in valid], float)
        ys = np.array([self.prompts.clicks[k].y for k in valid], float)
        ids = np.array(valid, np.int64)
        tile = 512
        regions = plan_regions(xs, ys, self.scale, self.patch, tile=tile)

        def write_chunk(cy, cx, block):
            t = time.perf_counter()
            store.write_chunk(cy, cx, block)
            self.timer.add("write", time.perf_counter() - t)

        stitcher = Stitcher(self.slide.width, self.slide.height, self.opts.chunk, write_chunk, self.retire)
        reach = (self.patch // 2 + 2) * self.scale
        row = -1
        for prob, meta in background(self.predictor.run(self.batches(regions, xs, ys, ids), self.timer), depth=2):
            t = time.perf_counter()
            for k, (idx, r, px0, py0) in enumerate(meta):
                if r != row:
                    row = r
                    tw = self.timer.seconds["write"]
                    stitcher.flush(r * tile * self.scale - reach)
                    t += self.timer.seconds["write"] - tw  # flushing is writing, not post-processing
                piece = self.piece(prob[k], idx, px0, py0)
                if piece is not None:
                    stitcher.add(piece)
            self.timer.add("post", time.perf_counter() - t)
            if progress is not None:
                progress.update(len(meta))
        stitcher.close()


class ArrayLabels:
    """An in-memory stand-in for :class:`LabelStore` (``write_chunk`` only), for tiles and evaluation."""

    def __init__(self, width: int, height: int, chunk: int) -> None:
        self.labels = np.zeros((height, width), np.uint32)
        self.chunk = chunk

    def write_chunk(self, cy: int, cx: int, block: np.ndarray) -> None:
        c = self.chunk
        self.labels[cy * c:cy * c + block.shape[0], cx * c:cx * c + block.shape[1]] = block


def predict_labels(slide: SlideSource, prompts: Prompts, model: LoadedModel, *, predictor: Predictor | None = None,
                   options: SegmentOptions | None = None, mpp: float | None = None, stem: str = "array"
                   ) -> tuple[np.ndarray, list[Instance], dict[int, str]]:
    """Segment the clicks of ``prompts`` on a small slide, in memory (no files).

    Returns the label image (ids = click index + 1), the instances and, per click index, the reason a
    click gave no instance. Runs exactly the code path of :func:`segment`.
    """
    opts = options or SegmentOptions(progress=False)
    mpp = mpp if mpp is not None else require_mpp(slide)
    predictor = predictor or Predictor(model, opts.device, opts.precision)
    run = _Run(slide, prompts, model, predictor, opts, stem, mpp)
    run.reasons = {k: r for k, r in enumerate(check_clicks(prompts, slide, opts.duplicate_px)) if r is not None}
    store = ArrayLabels(slide.width, slide.height, opts.chunk)
    run.run(store, None)
    run.instances.sort(key=lambda i: i.label)
    return store.labels, run.instances, run.reasons


def segment(slide_path: str | os.PathLike, points_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            options: SegmentOptions | None = None, model: LoadedModel | None = None, weights: str | None = None,
            predictor: Predictor | None = None, stem: str | None = None, gland_model: LoadedModel | None = None,
            gland_weights: str | None = None) -> SegmentResult:
    """Segment every click of ``points_path`` on ``slide_path``; write outputs into ``out_dir``.

    Outputs (``S`` = the slide's stem, or ``stem``): ``S.geojson`` (QuPath), ``S.xml`` (ASAP),
    ``S.parquet`` (GeoParquet) as chosen by ``options.formats``, ``S.labels.zarr`` and
    ``S.report.json``. Each is written under a temporary name and renamed when everything is done;
    on any error nothing is left in ``out_dir``.

    Squiggles (lines) are glands, segmented in the same run with a gland model (``gland_model`` /
    ``gland_weights``, or ``model``/``weights`` with ``options.task="gland"``) into ``S.glands.zarr``;
    their ids continue after the clicks' (squiggle k: number of clicks + k + 1). See :mod:`.glands`.

    Raises
    ------
    NuclickError
        Bad slide, annotation file, resolution, weights or output folder (one-line message).
    """
    opts = options or SegmentOptions()
    if opts.object_type not in OBJECT_TYPES:
        raise NuclickError(f"unknown object type {opts.object_type!r} (choose from {', '.join(OBJECT_TYPES)})")
    t_start = time.perf_counter()
    stem = stem or slide_stem(slide_path)
    paths = output_paths(out_dir, stem, opts.formats, opts.gzip)
    prompts = read_prompts(points_path, squiggle_groups=opts.squiggle_groups or None)
    # glands (squiggles): models, paths and run in glands.py; with no clicks the nucleus run is empty
    # (it writes an empty S.labels.zarr) and holds the gland model only as a placeholder
    model, gland_model = resolve_models(prompts, str(points_path), opts.task, model=model, weights=weights,
                                        gland_model=gland_model, gland_weights=gland_weights)
    paths = output_paths(out_dir, stem, opts.formats, opts.gzip, glands=gland_model is not None)
    model = model or gland_model
    slide = open_slide(slide_path, mpp=opts.mpp, bounds_offset=opts.bounds_offset, reader=opts.reader)
    try:
        mpp = require_mpp(slide)
        reasons = check_clicks(prompts, slide, opts.duplicate_px)
        sq_reasons = check_squiggles(prompts, slide)
        if all(r is not None and r.startswith("outside") for r in reasons + sq_reasons):
            raise NuclickError(
                f"{points_path}: none of its {len(reasons)} clicks"
                f"{f' and {len(sq_reasons)} squiggles' if sq_reasons else ''} lies on {slide.path} ({slide.width} x {slide.height} px"
                f"{', bounds offset ' + str(slide.bounds_offset) if any(slide.bounds_offset) else ''}); "
                "wrong slide, or clicks in another frame (see --no-bounds-offset)?")
        if opts.roi:
            reasons = roi_reasons(prompts, reasons, points_path)
        ensure_writable_dir(Path(out_dir))
        predictor = predictor or Predictor(model, opts.device, opts.precision)
        run = _Run(slide, prompts, model, predictor, opts if opts.task != "gland" else replace_fields(
            opts, threshold=None, min_object_px=None, min_hole_px=None), stem, mpp)
        run.reasons = {k: r for k, r in enumerate(reasons) if r is not None}
        n_valid = sum(r is None for r in reasons)
        grun = None
        if gland_model is not None:
            grun = GlandRun(slide, prompts, gland_model, Predictor(gland_model, opts.device, opts.precision),
                            _post_params(gland_model, opts if opts.task == "gland" else SegmentOptions()), stem, mpp,
                            first_label=len(prompts.clicks) + 1, timer=run.timer)
            grun.reasons = {k: r for k, r in enumerate(sq_reasons) if r is not None}
        progress = None
        if opts.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=n_valid, desc=f"{stem}", unit="nuclei", file=sys.stderr, dynamic_ncols=True)
        temps = {k: temp_path_for(p) for k, p in paths.items()}
        try:
            store = LabelStore.create(temps["labels"], slide.width, slide.height, chunk=opts.chunk, name="nuclei", mpp=mpp,
                                      ngff_version=opts.ngff)
            run.run(store, progress)
            t = time.perf_counter()
            run.instances.sort(key=lambda i: i.label)
            run.table.sort(key=lambda r: r["label"])
            store.finalize(run.table, colors=None)
            run.timer.add("write", time.perf_counter() - t)
            if grun is not None:
                grun.segment(temps["glands"], opts, progress=opts.progress)
            t = time.perf_counter()
            _write_polygons(run.instances + (grun.instances if grun else []), temps, opts, mpp)
            run.timer.add("write", time.perf_counter() - t)
            report = _report(run, paths, slide_path, points_path, time.perf_counter() - t_start)
            if grun is not None:
                add_to_report(report, grun)
            with atomic_output(temps["report"]) as tmp:
                tmp.write_text(json.dumps(report, indent=1) + "\n")
            # the report marks completion: drop the old one first, put the new one in last, so a kill
            # in between leaves a folder that reads as incomplete and is redone
            _remove(paths["report"])
            for key in [k for k in temps if k != "report"] + ["report"]:
                replace(temps[key], paths[key])
            _remove_stale_outputs(Path(out_dir), stem, set(paths.values()))
        except BaseException:
            for tmp in temps.values():
                _remove(tmp)
            raise
        finally:
            if progress is not None:
                progress.close()
    finally:
        slide.close()
    return SegmentResult(outputs=paths, report=report)


def _remove_stale_outputs(out: Path, stem: str, keep: set[Path]) -> None:
    """Remove polygon files of this stem that an earlier run wrote in another format (or gzipped or not).

    After a run the folder describes that run only: a stale ``S.xml`` beside a new ``S.geojson``
    would show outlines of other clicks.
    """
    for fmt, ext in FORMATS.items():
        for cand in (out / f"{stem}{ext}", out / f"{stem}{ext}.gz"):
            if cand not in keep and cand.is_file():
                cand.unlink()
    glands = out / f"{stem}.glands.zarr"  # from an earlier run whose file had squiggles
    if glands not in keep and glands.is_dir():
        _remove(glands)


def _write_polygons(instances: list[Instance], temps: dict[str, Path], opts: SegmentOptions, mpp: float) -> None:
    if "qupath" in temps:
        write_qupath(instances, temps["qupath"], object_type=opts.object_type, gzip=opts.gzip)
    if "asap" in temps:
        write_asap(instances, temps["asap"])
    if "geoparquet" in temps:
        write_geoparquet(instances, temps["geoparquet"], mpp=mpp)


def _report(run: _Run, paths: dict[str, Path], slide_path, points_path, wall: float) -> dict[str, Any]:
    by_index = {i.prompt_index: i for i in run.instances}
    clicks = []
    for k, c in enumerate(run.prompts.clicks):
        rec: dict[str, Any] = {"index": k, "x": c.x, "y": c.y, "class": c.class_name, "source": c.source}
        rec.update(outcome(by_index.get(k),
                           run.reasons.get(k, "nothing segmented: lost every pixel to neighbouring instances")))
        clicks.append(rec)
    reasons: dict[str, int] = {}
    for rec in clicks:
        if rec["status"] == "skipped":
            key = rec["reason"].split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    n_seg = len(run.instances)
    secs = {k: round(v, 3) for k, v in run.timer.seconds.items()}
    return {
        "nuclick_wsi_version": __version__,
        "slide": {"path": str(slide_path), "reader": run.slide.reader, "width": run.slide.width,
                  "height": run.slide.height, "bounds_offset": list(run.slide.bounds_offset),
                  "notes": list(getattr(run.slide, "notes", []))},
        "points": {"path": str(points_path), "format": run.prompts.format, "not_prompts": run.prompts.skipped},
        "mpp": {"slide": run.mpp, "source": run.slide.mpp_source, "model": run.model.mpp,
                "level0_px_per_model_px": run.scale},
        "model": {"source": run.model.source, "arch": run.model.arch, "patch_size": run.patch,
                  "postprocess": asdict(run.params.scaled(1 / run.scale ** 2)) if run.scale != 1 else asdict(run.params)},
        "device": run.predictor.description,
        "precision": {"name": run.predictor.precision.name, "reason": run.predictor.precision.reason},
        "totals": {"clicks": len(clicks), "segmented": n_seg, "skipped": len(clicks) - n_seg, "skipped_by_reason": reasons},
        "timings_s": {**secs, "wall": round(wall, 3), "nuclei_per_s": round(n_seg / wall, 2) if wall else None},
        "outputs": {k: str(p) for k, p in paths.items()},
        "clicks": clicks,
    }
