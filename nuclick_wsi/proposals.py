"""``propose``: a click proposed inside every nucleus the detector finds on a slide.

    from nuclick_wsi.proposals import propose
    result = propose("slide.svs", "out/")            # out/slide.proposals.geojson

The proposals are QuPath Points (annotations) of class "Proposed" with a "Proposal score"
measurement (the detector's peak probability): the pathologist imports them, deletes wrong ones,
adds missed ones, and ``segment --points`` takes the file as it is. A proposal is never an outline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nuclick_wsi.detection.slide import DetectOptions, Detections, detect_slide
from nuclick_wsi.errors import AnnotationError, ModelError
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.io.annotations.qupath_writer import point_feature, write_qupath_points
from nuclick_wsi.io.slides.registry import open_slide
from nuclick_wsi.io.slides.resolution import require_mpp
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.outputs import safety
from nuclick_wsi.outputs.paths import slide_stem
from nuclick_wsi.postprocess.trace import deterministic_uuid
from nuclick_wsi._util.fs import ensure_writable_dir

CLASS_NAME = "Proposed"
MEASUREMENT = "Proposal score"
SUFFIX = ".proposals.geojson"


@dataclass
class ProposeOptions:
    """Options of ``propose`` (the CLI flags of the same names)."""

    detect: DetectOptions = field(default_factory=DetectOptions)
    mpp: float | None = None
    bounds_offset: bool = True
    reader: str = "auto"


@dataclass
class ProposeResult:
    """The file written and what was found."""

    path: Path
    detections: Detections
    summary: dict[str, Any]


def read_roi(path: str | os.PathLike) -> Any:
    """The union of a file's area annotations (polygons), level-0 QuPath frame.

    Raises
    ------
    AnnotationError
        The file cannot be read as annotations, or holds no polygons (one line naming it).
    """
    from shapely import make_valid, union_all

    regions = read_prompts(path).regions
    if not regions:
        raise AnnotationError(f"{path}: --roi needs area annotations (polygons); the file has none")
    return union_all([make_valid(g) for g in regions])


def proposals_path(out_dir: str | os.PathLike, stem: str) -> Path:
    return Path(out_dir) / f"{stem}{SUFFIX}"


def propose(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, roi: str | os.PathLike | None = None,
            weights: str | os.PathLike | None = None, options: ProposeOptions | None = None,
            stem: str | None = None) -> ProposeResult:
    """Detect nuclei on the tissue of ``slide_path`` (or inside ``roi``'s areas) and write ``S.proposals.geojson``.

    Raises
    ------
    NuclickError
        Bad slide, resolution, ROI file, weights or output folder (one-line message); nothing is
        written then.
    """
    opts = options or ProposeOptions()
    t0 = time.perf_counter()
    stem = safety.check_stem(stem or slide_stem(slide_path))
    out = proposals_path(out_dir, stem)
    area = read_roi(roi) if roi is not None else None
    model = load_model(weights, task="detect")
    if model.task != "detect":
        raise ModelError(f"{model.source}: a {model.task} model, not a proposal detector (train one with --task detect)")
    safety.refuse_overlap({"slide": slide_path, "ROI file": roi, "weights": safety.local_file(weights)}, [out])
    slide = open_slide(slide_path, mpp=opts.mpp, bounds_offset=opts.bounds_offset, reader=opts.reader)
    try:
        mpp = require_mpp(slide)
        ensure_writable_dir(Path(out_dir))
        found = detect_slide(slide, model, mpp, options=opts.detect, roi=area)
    finally:
        slide.close()
    features = [point_feature(float(x), float(y), deterministic_uuid(stem, k, float(x), float(y), "proposal"),
                              class_name=CLASS_NAME, measurements={MEASUREMENT: round(float(s), 4)})
                for k, ((x, y), s) in enumerate(zip(found.xy, found.scores))]
    write_qupath_points(features, out)
    tissue_mp = found.tissue_px0 * (mpp / 0.25) ** 2 / 1e6  # megapixels at 0.25 um/px
    wall = time.perf_counter() - t0
    summary = {"proposals": len(features), "tiles": found.tiles, "threshold": found.threshold,
               "precision": found.precision, "tissue_mm2": round(found.tissue_px0 * mpp ** 2 / 1e6, 4),
               "tissue_mp_at_0.25": round(tissue_mp, 2), "wall_s": round(wall, 2),
               "mp_per_s": round(tissue_mp / wall, 2) if wall else None,
               "busy_s": {k: round(v, 2) for k, v in found.timer.seconds.items()}, "model": model.source}
    return ProposeResult(out, found, summary)


__all__ = ["CLASS_NAME", "MEASUREMENT", "ProposeOptions", "ProposeResult", "propose", "read_roi"]
