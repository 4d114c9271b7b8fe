"""Writing instances as QuPath GeoJSON: a FeatureCollection of detections (or annotations, cells)."""

from __future__ import annotations

import gzip as _gzip
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nuclick_wsi.io.annotations.qupath import OBJECT_TYPES
from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.records import Instance
from nuclick_wsi.io.annotations._common import color_for, fmt_number


# --------------------------------------------------------------------------------------------
# writing


def _ring(coords: Any) -> list[list[float | int]]:
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    ints = np.rint(xy)
    if np.array_equal(ints, xy):  # pixel-edge outlines: every vertex is a whole pixel corner
        return (ints.astype(np.int64) + 0).tolist()
    return [[fmt_number(x), fmt_number(y)] for x, y in xy]


def geometry_to_geojson(geom: Any) -> dict:
    """A shapely Polygon or MultiPolygon -> GeoJSON dict, 2 decimals, holes as interior rings."""
    if geom.geom_type == "Polygon":
        return {
            "type": "Polygon",
            "coordinates": [_ring(geom.exterior.coords)] + [_ring(r.coords) for r in geom.interiors],
        }
    if geom.geom_type == "MultiPolygon":
        return {
            "type": "MultiPolygon",
            "coordinates": [geometry_to_geojson(p)["coordinates"] for p in geom.geoms],
        }
    raise ValueError(f"cannot write a {geom.geom_type} as an instance outline")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def instance_feature(instance: Instance, object_type: str = "detection") -> dict:
    """One QuPath Feature for an instance (see :func:`write_qupath`)."""
    geometry = geometry_to_geojson(instance.geometry)
    feature: dict[str, Any] = {"type": "Feature", "id": instance.uuid, "geometry": geometry}
    if object_type == "cell":
        feature["nucleusGeometry"] = geometry
    props: dict[str, Any] = {"objectType": object_type}
    if instance.class_name is not None:
        color = color_for(instance.class_name, instance.color)
        props["classification"] = {"name": instance.class_name, "color": list(color)}
    # rounded so that float noise (875.0000000000001) does not reach the file
    measurements: dict[str, float] = {"Area px": round(float(instance.area_px), 2)}
    if _finite(instance.area_um2):
        measurements["Area um^2"] = round(float(instance.area_um2), 4)  # type: ignore[arg-type]
    if _finite(instance.score):
        measurements["NuClick score"] = round(float(instance.score), 4)
    if _finite(instance.confidence):
        measurements["NuClick confidence"] = round(float(instance.confidence), 4)  # type: ignore[arg-type]
    props["measurements"] = measurements
    props["isLocked"] = False
    feature["properties"] = props
    return feature


class FeatureMemory:
    """The feature text of the last write to each output file, kept by a watching process
    (:mod:`nuclick_wsi.workflows.watch`) so that a rerun writes its unchanged outlines without
    formatting them again. An entry is found by everything a feature is made of (its outline key
    stands in for the geometry) and counts only when the geometry is exactly the same (shapely ``==``),
    so an instance whose geometry a script replaced is written anew. Each file keeps only its last
    write's features, at most ``MAX`` (a larger slide is formatted each time), and only the ``FILES``
    files written last are kept (a watched QuPath project: the images being worked on)."""

    MAX = 100_000
    FILES = 4

    def __init__(self) -> None:
        self.files: OrderedDict[str, dict[tuple, tuple[Any, str]]] = OrderedDict()

    def of(self, path: str | os.PathLike) -> dict[tuple, tuple[Any, str]]:
        """The entries of output file ``path`` (its final path, not a temporary's)."""
        key = str(Path(path).resolve())
        entries = self.files.pop(key, {})
        self.files[key] = entries
        while len(self.files) > self.FILES:
            self.files.popitem(last=False)
        return entries


def _text(feature: dict) -> str:
    return json.dumps(feature, separators=(",", ":"), ensure_ascii=False)


def _texts(instances: Sequence[Instance], object_type: str, memo: dict | None):
    """:func:`instance_feature` of each instance as one line of JSON, taken from ``memo`` where it holds
    the same feature; ``memo`` then holds this write's features."""
    if memo is None:
        for inst in instances:
            yield _text(instance_feature(inst, object_type))
        return
    now: dict[tuple, tuple[Any, str]] = {}
    for inst in instances:
        key = None
        if inst.outline is not None:  # repr: -0.0 and 0.0, or 1 and 1.0, are written apart
            key = (object_type, inst.outline, inst.uuid, inst.class_name, repr(inst.color), repr(inst.area_px),
                   repr(inst.area_um2), repr(inst.score), repr(inst.confidence))
        hit = memo.get(key) if key is not None else None
        if hit is not None and hit[0] == inst.geometry:
            text = hit[1]
        else:
            text = _text(instance_feature(inst, object_type))
        if key is not None and len(now) < FeatureMemory.MAX:
            now[key] = (inst.geometry, text)
        yield text
    memo.clear()
    memo.update(now)


def point_feature(x: float, y: float, uid: str, *, class_name: str | None, measurements: dict[str, float],
                  object_type: str = "annotation") -> dict:
    """One QuPath Point Feature (a click): coordinates with 2 decimals, measurements as given."""
    props: dict[str, Any] = {"objectType": object_type}
    if class_name is not None:
        props["classification"] = {"name": class_name, "color": list(color_for(class_name, None))}
    props["measurements"] = measurements
    props["isLocked"] = False
    return {"type": "Feature", "id": uid, "geometry": {"type": "Point", "coordinates": [fmt_number(x), fmt_number(y)]},
            "properties": props}


def write_qupath_points(features: Sequence[dict], path: str | os.PathLike, *, gzip: bool | None = None) -> Path:
    """Write Point Features (:func:`point_feature`) as a QuPath GeoJSON FeatureCollection, atomically."""
    return _write_features((_text(f) for f in features), Path(path), gzip)


def write_qupath(
    instances: Sequence[Instance],
    path: str | os.PathLike,
    *,
    object_type: str = "detection",
    gzip: bool | None = None,
    memo: dict | None = None,
) -> Path:
    """Write instances as a QuPath GeoJSON FeatureCollection, atomically.

    Each Feature is ``{"type": "Feature", "id": uuid, "geometry": ..., "properties":
    {"objectType", "classification": {"name", "color": [r, g, b]}, "measurements": {"Area px",
    "Area um^2" (when known), "NuClick score"}, "isLocked": false}}``. ``classification`` is
    omitted for instances without a class; a class without a colour gets the palette colour.
    For ``object_type="cell"`` the nucleus is both ``geometry`` and the Feature-level
    ``nucleusGeometry`` (where QuPath reads it). Coordinates have at most 2 decimals, holes are
    interior rings; areas are rounded to 2 (px) or 4 (um^2) decimals, the score to 4. One Feature
    per line; the same input gives the same bytes (gzip without name or time stamp).

    Parameters
    ----------
    instances : sequence of Instance
        The objects, written in the given order.
    path : str or os.PathLike
        Output file.
    object_type : {"detection", "annotation", "cell"}
        QuPath object type; detections scale to millions of objects in QuPath.
    gzip : bool, optional
        Compress; by default when ``path`` ends in ``.gz``.
    memo : dict, optional
        The output file's entries of a :class:`FeatureMemory` (a watching process's): unchanged
        features are taken from it, and it is left holding this write's.

    Returns
    -------
    Path
        The written file.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, not {object_type!r}")
    return _write_features(_texts(instances, object_type, memo), Path(path), gzip)


def _write_features(lines, path: Path, gzip: bool | None) -> Path:
    """A FeatureCollection of Features (one line of JSON each, one per line), same bytes for the same
    input; gzip without name or time."""
    if gzip is None:
        gzip = path.suffix.lower() == ".gz"
    buf = io.StringIO()
    buf.write('{"type":"FeatureCollection","features":[')
    for k, line in enumerate(lines):
        buf.write("," if k else "")
        buf.write("\n")
        buf.write(line)
    buf.write("\n]}\n")
    data = buf.getvalue().encode("utf-8")
    with atomic_output(path) as tmp:
        if gzip:
            with open(tmp, "wb") as raw, _gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0
            ) as gz:
                gz.write(data)
        else:
            tmp.write_bytes(data)
    return path
