"""What the QC report reads: the outputs ``segment`` already wrote, never the model.

``S.report.json`` (run, clicks and their outcomes), ``S.labels.zarr`` (its instance table and
pyramid) and ``S.geojson`` (the outlines). :func:`load_outputs` gathers them into one
:class:`QcInputs`; a missing or foreign file is a :class:`~nuclick_wsi.errors.NuclickError`
naming it.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shapely.geometry import shape

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.store.instances import read_instance_table

#: GeoJSON measurement / report field of the per-outline confidence (issue 11), when the run has it
CONFIDENCE_FIELD = "confidence"
CONFIDENCE_MEASUREMENT = "NuClick confidence"
SCORE_MEASUREMENT = "NuClick score"


@dataclass
class Outline:
    """One segmented click, with what the QC needs to show and judge it."""

    label: int
    index: int  #: click index in the report
    uuid: str
    x: float  #: the click, level-0 px
    y: float
    class_name: str
    area_px: float
    area_um2: float | None
    value: float  #: the confidence shown (``confidence`` when the run has it, else the mean score)
    geometry: Any  #: shapely polygon, level-0 px (QuPath frame)


@dataclass
class QcInputs:
    """Everything the report page and the review list are built from."""

    out_dir: Path
    stem: str
    report: dict[str, Any]
    outlines: list[Outline]
    skipped: list[dict[str, Any]]  #: report click records with status "skipped"
    measure: str  #: "confidence" or "score": which one ``Outline.value`` holds
    labels_path: Path
    geojson_path: Path
    slide_path: Path
    class_rgb: dict[str, tuple[int, int, int]] = field(default_factory=dict)  #: QuPath colour per class

    @property
    def mpp(self) -> float | None:
        return (self.report.get("mpp") or {}).get("slide")


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return json.loads(raw)
    except FileNotFoundError:
        raise NuclickError(f"{path}: not found (the QC report reads the outputs of segment)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise NuclickError(f"{path}: cannot be read as JSON ({exc})") from None


def _geojson_path(out_dir: Path, stem: str, report: dict[str, Any]) -> Path:
    named = (report.get("outputs") or {}).get("qupath")
    for cand in ([Path(named).name] if named else []) + [f"{stem}.geojson", f"{stem}.geojson.gz"]:
        if (out_dir / cand).is_file():
            return out_dir / cand
    raise NuclickError(f"{out_dir / (stem + '.geojson')}: not found; the QC report needs the QuPath outlines "
                       "(segment --format qupath, the default)")


def class_name(name: str | None) -> str:
    """The class shown for a click without one."""
    return name if name else "Unclassified"


def load_outputs(out_dir: str | Path, stem: str) -> QcInputs:
    """Read ``S.report.json``, ``S.labels.zarr/instances.csv`` and ``S.geojson`` of ``stem`` in ``out_dir``."""
    out = Path(out_dir)
    report_path = out / f"{stem}.report.json"
    report = _read_json(report_path)
    if not isinstance(report, dict) or "clicks" not in report or "slide" not in report:
        raise NuclickError(f"{report_path}: not a nuclick-wsi report (no clicks / slide)")
    labels = out / f"{stem}.labels.zarr"
    try:
        table = {row["label"]: row for row in read_instance_table(labels)}
    except (OSError, ValueError) as exc:
        raise NuclickError(f"{labels}: cannot read its instance table ({exc})") from None
    geo_path = _geojson_path(out, stem, report)
    doc = _read_json(geo_path)
    geoms = {f.get("id"): f for f in (doc.get("features") or []) if isinstance(f, dict)}
    clicks = report["clicks"]
    measure = "confidence" if any(CONFIDENCE_FIELD in c for c in clicks if c.get("status") == "segmented") else "score"
    outlines, skipped = [], []
    for c in clicks:
        if c.get("status") != "segmented":
            skipped.append(c)
            continue
        feat = geoms.get(c.get("uuid"))
        row = table.get(c.get("instance_id"))
        if feat is None or row is None:
            raise NuclickError(f"{geo_path}: click {c['index']} (outline {c.get('instance_id')}) is in the report "
                               f"but not in {'the outlines' if feat is None else labels.name}; outputs of different runs?")
        value = c.get(CONFIDENCE_FIELD, c.get("score"))
        outlines.append(Outline(label=int(c["instance_id"]), index=int(c["index"]), uuid=c["uuid"], x=float(c["x"]),
                                y=float(c["y"]), class_name=class_name(c.get("class")), area_px=float(c["area_px"]),
                                area_um2=row.get("area_um2"), value=float("nan") if value is None else float(value),
                                geometry=shape(feat["geometry"])))
    return QcInputs(out_dir=out, stem=stem, report=report, outlines=outlines, skipped=skipped, measure=measure,
                    labels_path=labels, geojson_path=geo_path, slide_path=Path(report["slide"]["path"]),
                    class_rgb=_class_rgb(geoms.values()))


def _class_rgb(features) -> dict[str, tuple[int, int, int]]:
    out = {}
    for f in features:
        cls = (f.get("properties") or {}).get("classification") or {}
        if cls.get("name") and isinstance(cls.get("color"), list) and len(cls["color"]) >= 3:
            out.setdefault(cls["name"], tuple(int(v) for v in cls["color"][:3]))
    return out


def finite(values) -> list[float]:
    """The finite numbers of ``values``."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]
