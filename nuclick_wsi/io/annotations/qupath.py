"""QuPath GeoJSON: read clicks and squiggles, write and read back instance outlines.

Facts about QuPath's GeoJSON (qupath/qupath, ``qupath-core/.../io/PathObjectTypeAdapters.java``,
``ROITypeAdapters.java``; pull request #1099 "Improved GeoJSON support", QuPath 0.4):

- QuPath reads a FeatureCollection (any object with a ``features`` array), a single Feature,
  a JSON array of Features, or a bare geometry.
- The object type is ``properties.objectType``, else ``object_type`` (legacy), else ``type``;
  missing means annotation. Types: annotation, detection, cell, tile, tmaCore, root.
- ``classification`` is ``{"name": str, "color": [r, g, b]}`` or, for a derived class,
  ``{"names": [...], "color": [...]}``; QuPath 0.2/0.3 wrote ``colorRGB`` (packed int).
  Derived class names are shown joined by ``": "``.
- ``measurements`` is a JSON object ``{name: value}`` since 0.4; before, a list of
  ``{"name", "value"}``; QuPath reads both.
- A cell's nucleus is a Feature-level member ``nucleusGeometry`` (a sibling of ``geometry``, not a
  property); QuPath reads it from there for objectType "cell".
- The image plane is written as a ``plane`` member *of the geometry* (``{"c", "z", "t"}``), and only
  when it is not the default plane; ``isLocked`` is written only when true.
- Coordinates are written with at most 2 decimals.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any


from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import RGB, Click, Prompts, Squiggle
from nuclick_wsi.io.annotations._common import check_exists, load_json_text, unpack_rgb

GEOMETRY_TYPES = (
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
)
OBJECT_TYPES = ("detection", "annotation", "cell")
#: QuPath 0.2 stored the object type in ``id``
LEGACY_TYPE_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}


# --------------------------------------------------------------------------------------------
# reading


def load_geojson(path: str | os.PathLike) -> tuple[Any, str]:
    """Parse a (possibly gzipped or zipped) GeoJSON file.

    Returns
    -------
    obj : object
        The parsed JSON.
    where : str
        The file (and zip member) for messages.

    Raises
    ------
    AnnotationError
        For an empty file or broken JSON (naming the line and column).
    """
    path = check_exists(path)
    text, where = load_json_text(path)
    if not text.strip():
        raise AnnotationError(f"{where}: empty file")
    try:
        return json.loads(text), where
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{where}: broken JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    except RecursionError as exc:
        raise AnnotationError(f"{where}: JSON nested too deeply") from exc


def features_of(obj: Any, where: str) -> list[dict]:
    """The list of Features in any of the shapes QuPath reads.

    A bare geometry becomes one Feature without properties (an annotation).
    """
    if isinstance(obj, list):
        items = obj
    elif isinstance(obj, dict):
        kind = obj.get("type")
        if isinstance(obj.get("features"), list):
            items = obj["features"]
        elif kind == "FeatureCollection":
            raise AnnotationError(f"{where}: FeatureCollection without a 'features' array")
        elif kind == "Feature" or "geometry" in obj:
            items = [obj]
        elif kind in GEOMETRY_TYPES:
            items = [{"type": "Feature", "geometry": obj, "properties": {}}]
        else:
            raise AnnotationError(
                f"{where}: not GeoJSON (expected a FeatureCollection, a Feature, a list of "
                f"Features or a geometry; found type {kind!r})"
            )
    else:
        raise AnnotationError(f"{where}: not GeoJSON (top level is a JSON {type(obj).__name__})")
    if not items:
        raise AnnotationError(f"{where}: no features")
    features = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise AnnotationError(f"{where}: feature {i} is not a JSON object")
        if item.get("type") in GEOMETRY_TYPES and "geometry" not in item:
            item = {"type": "Feature", "geometry": item, "properties": {}}
        features.append(item)
    return features


def labelled_features(obj: Any, where: str) -> Iterator[tuple[str, dict]]:
    """Every Feature with its label, depth first: "feature 3", and the child objects QuPath nests in a
    feature's properties when it writes a hierarchy ("childObjects", read also as "children", as QuPath
    does): "feature 3, child 0"."""
    stack = [(f"feature {i}", f) for i, f in enumerate(features_of(obj, where))][::-1]
    while stack:  # a loop, not recursion: nesting depth is the file's to choose
        label, feature = stack.pop()
        yield label, feature
        props = feature.get("properties")
        if not isinstance(props, dict):
            continue
        children = props.get("childObjects" if "childObjects" in props else "children")
        if not isinstance(children, list):
            continue
        for k in reversed(range(len(children))):
            if not isinstance(children[k], dict):
                raise AnnotationError(f"{where}: {label}, child {k} is not a JSON object")
            stack.append((f"{label}, child {k}", children[k]))


def object_type_of(feature: dict) -> str:
    """QuPath's object type of a Feature: objectType, object_type, then type; default annotation."""
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        props = {}
    for key in ("objectType", "object_type"):
        if isinstance(props.get(key), str):
            return props[key]
    kind = props.get("type")
    if isinstance(kind, str) and kind != "Feature":
        return kind
    legacy = feature.get("id")
    if isinstance(legacy, str) and legacy in LEGACY_TYPE_IDS:
        return LEGACY_TYPE_IDS[legacy]
    return "annotation"


def _color_value(value: Any) -> RGB | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return unpack_rgb(value)
    if isinstance(value, float) and value.is_integer():
        return unpack_rgb(int(value))
    if isinstance(value, list) and len(value) >= 3 and all(isinstance(v, (int, float)) for v in value[:3]):
        return tuple(max(0, min(255, int(v))) for v in value[:3])  # type: ignore[return-value]
    return None


def classification_of(feature: dict) -> tuple[str | None, RGB | None]:
    """Class name and colour of a Feature.

    ``{"name", "color"}`` or ``{"names": [...]}`` (joined with ``": "``, as QuPath displays derived
    classes); colour as ``[r, g, b]``, a packed int, or legacy ``colorRGB``. Without a class
    colour the object's own ``properties.color`` is used.
    """
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        return None, None
    cls = props.get("classification")
    name: str | None = None
    color: RGB | None = None
    if isinstance(cls, str):
        name = cls or None
    elif isinstance(cls, dict):
        names = cls.get("names")
        if isinstance(names, list) and names:
            name = ": ".join(str(n) for n in names)
        elif isinstance(cls.get("name"), str) and cls["name"]:
            name = cls["name"]
        color = _color_value(cls.get("color"))
        if color is None:
            color = _color_value(cls.get("colorRGB"))
    if color is None:
        color = _color_value(props.get("color"))
    return name, color


def _check_plane(feature: dict, label: str, where: str) -> None:
    props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
    geom = feature.get("geometry") if isinstance(feature.get("geometry"), dict) else {}
    for holder in (geom, props):
        plane = holder.get("plane")
        if isinstance(plane, dict):
            z, t = plane.get("z", 0) or 0, plane.get("t", 0) or 0
            if z != 0 or t != 0:
                raise AnnotationError(
                    f"{where}: {label} lies on plane z={z}, t={t}; nuclick-wsi reads 2-D slides and "
                    "only objects on the first plane (z=0, t=0)"
                )


def _point(value: Any, label: str, where: str) -> tuple[float, float]:
    if (
        isinstance(value, (list, tuple))
        and len(value) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:2])
    ):
        try:  # a JSON integer may exceed float range
            x, y = float(value[0]), float(value[1])
        except OverflowError:
            x = y = math.nan
        if math.isfinite(x) and math.isfinite(y):
            return x, y
    raise AnnotationError(f"{where}: {label}: bad coordinate {json.dumps(value)[:60]}")


def _points(value: Any, label: str, where: str) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: {label}: coordinates are not a list")
    return [_point(v, label, where) for v in value]


def parse_geometry(geom: Any, label: str, where: str) -> Any:
    """A GeoJSON geometry -> shapely geometry, with messages naming the feature."""
    from shapely.geometry import (
        GeometryCollection,
        LineString,
        MultiLineString,
        MultiPoint,
        MultiPolygon,
        Point,
        Polygon,
    )

    if not isinstance(geom, dict):
        raise AnnotationError(f"{where}: {label}: geometry is not a JSON object")
    kind = geom.get("type")
    coords = geom.get("coordinates")

    def polygon(rings: Any) -> Polygon:
        if not isinstance(rings, list) or not rings:
            raise AnnotationError(f"{where}: {label}: a Polygon needs at least one ring")
        parts = [_points(r, label, where) for r in rings]
        for ring in parts:
            if len(ring) < 3:
                raise AnnotationError(f"{where}: {label}: a Polygon ring needs 3 or more points")
        return Polygon(parts[0], parts[1:])

    def line(value: Any) -> LineString:
        pts = _points(value, label, where)
        if len(pts) < 2:  # GEOS refuses a line of one point, or an empty part of a MultiLineString
            raise AnnotationError(f"{where}: {label}: a line needs 2 or more points")
        return LineString(pts)

    if kind == "Point":
        return Point(_point(coords, label, where))
    if kind == "MultiPoint":
        return MultiPoint(_points(coords, label, where))
    if kind == "LineString":
        return line(coords) if coords else LineString()
    if kind == "MultiLineString":
        if not isinstance(coords, list):
            raise AnnotationError(f"{where}: {label}: coordinates are not a list")
        return MultiLineString([line(c) for c in coords])
    if kind == "Polygon":
        return polygon(coords)
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(f"{where}: {label}: coordinates are not a list")
        return MultiPolygon([polygon(c) for c in coords])
    if kind == "GeometryCollection":
        parts = geom.get("geometries")
        if not isinstance(parts, list):
            raise AnnotationError(f"{where}: {label}: GeometryCollection without 'geometries'")
        return GeometryCollection([parse_geometry(g, label, where) for g in parts])
    raise AnnotationError(f"{where}: {label}: unsupported geometry type {kind!r}")


def _flatten(geom: Any) -> Iterator[Any]:
    if geom.geom_type == "GeometryCollection":
        for part in geom.geoms:
            yield from _flatten(part)
    else:
        yield geom


def prompts_from_geojson(obj: Any, where: str) -> Prompts:
    """Clicks, squiggles and regions from parsed QuPath GeoJSON.

    Point / MultiPoint -> one click per point, in file order; LineString / MultiLineString ->
    squiggles; Polygon / MultiPolygon annotations -> ``regions`` (and a ``skipped`` line);
    polygons of detections and cells, and empty geometries, are skipped. ``source`` names the
    feature by its 0-based position in the file ("feature 3"; a nested child object: "feature 3, child 0").
    """
    prompts = Prompts(format="qupath")
    for label, feature in labelled_features(obj, where):
        geom_json = feature.get("geometry")
        if geom_json is None:
            prompts.skipped.append(f"{label}: no geometry")
            continue
        _check_plane(feature, label, where)
        geom = parse_geometry(geom_json, label, where)
        object_type = object_type_of(feature)
        class_name, color = classification_of(feature)
        for part in _flatten(geom):
            kind = part.geom_type
            if part.is_empty:
                prompts.skipped.append(f"{label}: empty {kind}")
            elif kind in ("Point", "MultiPoint"):
                pts = [part] if kind == "Point" else list(part.geoms)
                for k, p in enumerate(pts):
                    source = label if kind == "Point" else f"{label}, point {k}"
                    prompts.clicks.append(
                        Click(p.x, p.y, class_name, color, source, len(prompts.clicks))
                    )
            elif kind in ("LineString", "MultiLineString"):
                lines = [part] if kind == "LineString" else list(part.geoms)
                for k, line in enumerate(lines):
                    source = label if kind == "LineString" else f"{label}, line {k}"
                    coords = tuple((float(x), float(y)) for x, y, *_ in line.coords)
                    if len(coords) < 2:
                        prompts.skipped.append(f"{source}: a line needs 2 or more points")
                        continue
                    prompts.squiggles.append(
                        Squiggle(coords, class_name, color, source, len(prompts.squiggles))
                    )
            elif object_type == "annotation":
                prompts.regions.append(part)
                prompts.skipped.append(f"{label}: {kind} annotation is not a prompt (kept as a region)")
            else:
                prompts.skipped.append(f"{label}: {kind} {object_type} is not a prompt")
    return prompts


def read_prompts(path: str | os.PathLike) -> Prompts:
    """Read clicks and squiggles from a QuPath GeoJSON file (plain, ``.gz`` or ``.zip``).

    Parameters
    ----------
    path : str or os.PathLike
        The file; gzip and zip are recognised by their magic bytes.

    Returns
    -------
    Prompts
        With ``format="qupath"`` and ``path`` filled.

    Raises
    ------
    AnnotationError
        Broken JSON, no features, bad geometries, objects on another z-slice or timepoint.
    """
    obj, where = load_geojson(path)
    prompts = prompts_from_geojson(obj, where)
    prompts.path = str(path)
    return prompts


def measurements_of(feature: dict) -> dict[str, float]:
    """Measurements as a dict, from QuPath 0.4+ (object) or 0.2/0.3 (list of name/value)."""
    props = feature.get("properties") or {}
    raw = props.get("measurements") if isinstance(props, dict) else None
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    if isinstance(raw, list):
        return {
            str(m["name"]): m.get("value")
            for m in raw
            if isinstance(m, dict) and "name" in m
        }
    return {}


def read_qupath_polygons(path: str | os.PathLike) -> list[dict]:
    """Read polygon objects back from a QuPath GeoJSON file (for round trips and checks).

    Returns
    -------
    list of dict
        One dict per Feature with a (Multi)Polygon geometry, in file order, with keys
        ``uuid`` (the Feature ``id`` or None), ``geometry`` (shapely), ``nucleus_geometry``
        (shapely or None), ``class_name``, ``color``, ``measurements`` (dict) and ``object_type``.
    """
    obj, where = load_geojson(path)
    out = []
    for i, feature in enumerate(features_of(obj, where)):
        label = f"feature {i}"
        if feature.get("geometry") is None:
            continue
        geom = parse_geometry(feature["geometry"], label, where)
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        nucleus = feature.get("nucleusGeometry")
        class_name, color = classification_of(feature)
        out.append(
            {
                "uuid": feature.get("id"),
                "geometry": geom,
                "nucleus_geometry": None if nucleus is None else parse_geometry(nucleus, label, where),
                "class_name": class_name,
                "color": color,
                "measurements": measurements_of(feature),
                "object_type": object_type_of(feature),
            }
        )
    return out


