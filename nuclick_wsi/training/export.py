"""``export-training``: segment outputs (slide + outlines) -> a training set that ``train`` and others read.

Layout of the dataset folder (every tile at the model's um/px, ``tile`` x ``tile`` px)::

    images/NAME.png     RGB
    labels/NAME.tif     instance labels (uint16, or uint32 past 65,535 instances; 0 = background)
    valid/NAME.png      255 where an unlabelled pixel is known background (inside --roi), 0 elsewhere
    geojson/NAME.geojson  the tile's outlines as QuPath detections, in tile pixels
    manifest.json       provenance (slide, region, model, date, version) and class ids per instance

``NAME`` is ``<slide stem>_x<X>_y<Y>`` with ``(X, Y)`` the tile's level-0 corner. The folder is written
under a temporary name and renamed when complete; an existing folder is replaced only when it holds
an earlier export (its manifest says so).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nuclick_wsi import __version__
from nuclick_wsi._util.fs import atomic_output, ensure_writable_dir
from nuclick_wsi.errors import NuclickError, OutputError
from nuclick_wsi.outputs.safety import refuse_overlap
from nuclick_wsi.training.regions import RegionTile, iter_region_tiles, read_outlines, read_roi

TOOL = "nuclick-wsi export-training"
NO_ROI = ("no --roi: an area you did not click completely would teach its unclicked nuclei as background; "
          "mark the fully clicked areas and pass --roi areas.geojson, or pass --around-outlines")


@dataclass
class SlideRun:
    """One slide's segment outputs, as its report names them."""

    stem: str
    report: Path
    slide: Path
    outlines: Path
    slide_mpp: float
    model_mpp: float
    model: str
    reader: str
    bounds_offset: bool


def find_runs(out_dir: Path) -> list[SlideRun]:
    """The slides segmented into ``out_dir`` (one ``S.report.json`` each) with a QuPath GeoJSON output."""
    runs = []
    for report in sorted(Path(out_dir).glob("*.report.json")):
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
            slide = data["slide"]
            outs = {k: report.parent / Path(v).name for k, v in data["outputs"].items()}
            model_mpp, slide_mpp = float(data["mpp"]["model"]), float(data["mpp"]["slide"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NuclickError(f"{report}: not a nuclick-wsi segment report ({type(exc).__name__}: {exc})") from None
        if "qupath" not in outs:
            raise NuclickError(f"{report}: the run wrote no QuPath GeoJSON; rerun segment with --format qupath")
        path = Path(slide["path"])
        if not path.exists() and (report.parent / path).exists():
            path = report.parent / path
        if not path.exists():
            raise NuclickError(f"{report}: its slide {slide['path']} is not found (run from the folder segment "
                               "ran in, or keep the slide where it was)")
        runs.append(SlideRun(report.name[: -len(".report.json")], report, path, outs["qupath"], slide_mpp,
                             model_mpp, str(data.get("model", {}).get("source", "")), slide.get("reader", "auto"),
                             any(v != 0 for v in slide.get("bounds_offset", [0, 0]))))
    if not runs:
        raise NuclickError(f"{out_dir}: no S.report.json from `nuclick-wsi segment` here")
    return runs


def match_rois(runs: list[SlideRun], rois: list[Path]) -> dict[str, Path]:
    """Slide stem -> its areas file: the one file for one slide, else the file whose name starts with the stem."""
    if len(runs) == 1 and len(rois) == 1:
        return {runs[0].stem: rois[0]}
    out = {}
    for roi in rois:
        stems = [r.stem for r in runs if roi.name.startswith(r.stem)]
        if not stems:
            raise NuclickError(f"{roi}: --roi matches no slide (with several slides its name must start with "
                               f"the slide's stem: {', '.join(r.stem for r in runs)})")
        out[max(stems, key=len)] = roi
    return out


def _check_target(dataset: Path, out_dir: Path, runs: list[SlideRun], rois: list[Path]) -> None:
    inputs: dict[str, Any] = {"segment outputs": out_dir}
    inputs.update({f"slide {r.stem}": r.slide for r in runs})
    inputs.update({f"areas {p.name}": p for p in rois})
    refuse_overlap(inputs, [dataset])
    if dataset.exists():
        manifest = dataset / "manifest.json"
        try:
            ours = json.loads(manifest.read_text(encoding="utf-8")).get("tool") == TOOL
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours and (not dataset.is_dir() or any(dataset.iterdir())):
            raise OutputError(f"{dataset}: exists and is not an earlier export-training folder; choose another -o")


def _write_tile(root: Path, rt: RegionTile, class_ids: dict[str, int]) -> dict[str, Any]:
    """Write one tile's files; return its manifest entry."""
    import tifffile
    from PIL import Image

    from nuclick_wsi.io.annotations import write_qupath
    from nuclick_wsi.records import Instance

    Image.fromarray(rt.image).save(root / "images" / f"{rt.name}.png")
    n = int(rt.labels.max())
    tifffile.imwrite(root / "labels" / f"{rt.name}.tif", rt.labels.astype(np.uint16 if n < 65536 else np.uint32),
                     compression="zlib")
    Image.fromarray((rt.valid * 255).astype(np.uint8)).save(root / "valid" / f"{rt.name}.png")
    instances = [Instance(label=k, uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rt.name}/{k}")), geometry=g,
                          class_name=c, area_px=float(g.area)) for k, (g, c) in enumerate(zip(rt.geometries, rt.classes), 1)]
    write_qupath(instances, root / "geojson" / f"{rt.name}.geojson")
    x, y, w, h = rt.region
    return {"name": rt.name, "region_level0": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)],
            "instances": n, "valid_fraction": round(float(rt.valid.mean()), 4),
            "types": {str(k): class_ids.get(c, 0) if c else 0 for k, c in enumerate(rt.classes, 1)}}


def export_training(out_dir: str | Path, dataset: str | Path, *, tile: int = 256, rois: list[Path] = (),
                    around_outlines: bool = False, grow_um: float = 2.0, progress: bool = True, log=print) -> dict:
    """Export the segment outputs in ``out_dir`` as a training set in ``dataset``; returns the manifest."""
    out_dir, dataset, rois = Path(out_dir), Path(dataset), [Path(p) for p in rois]
    if not rois and not around_outlines:
        raise NuclickError(NO_ROI)
    runs = find_runs(out_dir)
    _check_target(dataset, out_dir, runs, rois)
    roi_of = match_rois(runs, rois) if rois else {}
    plans = [(r, read_outlines(r.outlines), read_roi(roi_of[r.stem]) if rois and r.stem in roi_of else None)
             for r in runs if not rois or r.stem in roi_of]
    for r in runs:
        if rois and r.stem not in roi_of:
            log(f"{r.stem}: skipped (no --roi areas for it)")
    classes = sorted({c for _, o, _ in plans for c in o.classes if c})
    class_ids = {c: k for k, c in enumerate(classes, 1)}
    ensure_writable_dir(dataset.parent)
    manifest: dict[str, Any] = {
        "tool": TOOL, "nuclick_wsi_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "tile": tile, "mpp": None, "mode": "roi" if rois else "around-outlines",
        "complete": bool(rois), "grow_um": None if rois else grow_um,
        "note": ("every nucleus inside the --roi areas was clicked" if rois else
                 "--around-outlines: only clicked nuclei are labelled; valid is the outlines grown by grow_um, "
                 "so train with the valid mask as an ignore mask (elsewhere a nucleus may be unlabelled)"),
        "valid": "valid/NAME.png: 255 where an unlabelled pixel is background; 0: unknown (ignore in the loss)",
        "classes": {"background": 0, **class_ids}, "slides": [], "tiles": []}
    with atomic_output(dataset) as tmp:
        for sub in ("images", "labels", "valid", "geojson"):
            (tmp / sub).mkdir(parents=True)
        for run, outlines, area in plans:
            manifest["slides"].append(_export_slide(tmp, run, outlines, area, roi_of.get(run.stem), tile, grow_um,
                                                    class_ids, manifest, progress))
            log(f"{run.stem}: {manifest['slides'][-1]['tiles']} tiles")
        with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _export_slide(root: Path, run: SlideRun, outlines, area, roi: Path | None, tile: int, grow_um: float,
                  class_ids: dict[str, int], manifest: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Write one slide's tiles (one region read each); return its manifest entry."""
    from contextlib import closing

    from tqdm.auto import tqdm

    from nuclick_wsi.io.slides import open_slide

    if manifest["mpp"] not in (None, run.model_mpp):
        raise NuclickError(f"{run.report}: model um/px {run.model_mpp} differs from the other slides' "
                           f"{manifest['mpp']}; export them separately")
    manifest["mpp"] = run.model_mpp
    count = 0
    with closing(open_slide(run.slide, mpp=run.slide_mpp, reader=run.reader, bounds_offset=run.bounds_offset)) as slide:
        tiles = iter_region_tiles(slide, outlines, mpp=run.model_mpp, tile=tile, roi=area, grow_um=grow_um,
                                  stem=run.stem)
        for rt in tqdm(tiles, desc=run.stem, unit="tile", disable=not progress, file=sys.stderr):
            entry = _write_tile(root, rt, class_ids)
            manifest["tiles"].append({"slide": run.stem, **entry})
            count += 1
    return {"stem": run.stem, "slide": os.path.abspath(run.slide), "slide_mpp": run.slide_mpp, "report": str(run.report),
            "outlines": str(run.outlines), "model": run.model, "roi": None if roi is None else str(roi),
            "tiles": count}
