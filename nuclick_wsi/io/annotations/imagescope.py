"""Aperio ImageScope XML: read clicks, squiggles and regions; polygons for training sets.

Layout: ``Annotations[MicronsPerPixel]/Annotation[Name, LineColor]/Regions/Region[Type,
NegativeROA]/Vertices/Vertex[X, Y]``. ``LineColor`` is a Windows COLORREF (``0x00BBGGRR``).

Region ``Type`` codes: 0 freehand outline (closed; MoNuSeg nuclei are of this type),
1 rectangle, 2 ellipse (two corners of its bounding box), 3 arrow (these four are confirmed by
public ImageScope readers); 4 ruler, 5 pin (point) and 6 polyline are the codes commonly
reported for the other tools. How each is read:

- a pin, or any region with a single vertex -> a click;
- a polyline with two or more vertices -> a squiggle; so is every freehand region of an
  annotation layer whose Name is in ``squiggle_groups`` (ImageScope has no "open freehand" flag);
- freehand, rectangle and ellipse regions -> ``regions`` (negative regions, ``NegativeROA="1"``,
  are skipped);
- arrows, rulers and unknown types are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from typing import Any

from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import RGB, Click, Prompts, Squiggle
from nuclick_wsi.io.annotations._common import check_exists, parse_float, parse_xml

ROOT_TAG = "Annotations"
FREEHAND, RECTANGLE, ELLIPSE, ARROW, RULER, PIN, POLYLINE = "0", "1", "2", "3", "4", "5", "6"
TYPE_NAMES = {
    FREEHAND: "freehand",
    RECTANGLE: "rectangle",
    ELLIPSE: "ellipse",
    ARROW: "arrow",
    RULER: "ruler",
    PIN: "pin",
    POLYLINE: "polyline",
}


def colorref(value: str | None) -> RGB | None:
    """An ImageScope ``LineColor`` (COLORREF, ``0x00BBGGRR``) -> ``(r, g, b)``."""
    if not value:
        return None
    try:
        v = int(value)
    except ValueError:
        return None
    return (v & 255, (v >> 8) & 255, (v >> 16) & 255)


def _vertices(region: Any, label: str, where: str) -> list[tuple[float, float]]:
    pts = []
    for k, vertex in enumerate(region.iter("Vertex")):
        try:
            pts.append((parse_float(vertex.get("X", "")), parse_float(vertex.get("Y", ""))))
        except ValueError as exc:
            raise AnnotationError(
                f"{where}: {label}: vertex {k} has X={vertex.get('X')!r}, Y={vertex.get('Y')!r}, "
                "not numbers"
            ) from exc
    return pts


def _outline(kind: str, pts: list[tuple[float, float]]) -> Any:
    """The closed shape of a freehand, rectangle or ellipse region (None if degenerate)."""
    from shapely import affinity
    from shapely.geometry import Point, Polygon

    if kind == ELLIPSE and len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        if x1 <= x0 or y1 <= y0:
            return None
        circle = Point((x0 + x1) / 2, (y0 + y1) / 2).buffer(1.0, quad_segs=16)
        return affinity.scale(circle, (x1 - x0) / 2, (y1 - y0) / 2)
    if len(pts) < 3:
        return None
    return Polygon(pts)


def _mpp(root: Any) -> float | None:
    text = root.get("MicronsPerPixel")
    if not text:
        return None
    try:
        value = parse_float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def _check_root(root: Any, where: str) -> None:
    if root.tag != ROOT_TAG:
        raise AnnotationError(
            f"{where}: not Aperio ImageScope XML (root element <{root.tag}>, expected <{ROOT_TAG}>)"
        )


def prompts_from_root(
    root: Any, where: str, *, squiggle_groups: Collection[str] | None = None
) -> Prompts:
    """Prompts from a parsed ImageScope XML root (see the module docstring for the rules).

    The class of every region is its annotation layer's ``Name`` (None when empty); the colour
    is the layer's ``LineColor``.
    """
    _check_root(root, where)
    squiggle_groups = set(squiggle_groups or ())
    prompts = Prompts(format="imagescope")
    layers = root.findall("Annotation")
    if root.find(".//Region") is None:
        raise AnnotationError(f"{where}: no regions")
    for a, layer in enumerate(layers):
        class_name = layer.get("Name") or None
        color = colorref(layer.get("LineColor"))
        layer_label = f"Annotation {layer.get('Id') or a}"
        for r, region in enumerate(layer.iter("Region")):
            label = f"{layer_label} Region {region.get('Id') or r}"
            kind = region.get("Type") or FREEHAND
            kind_name = TYPE_NAMES.get(kind, f"type {kind}")
            pts = _vertices(region, label, where)
            if not pts:
                prompts.skipped.append(f"{label}: no vertices")
            elif region.get("NegativeROA") == "1":
                prompts.skipped.append(f"{label}: negative {kind_name} region is not a prompt")
            elif kind == PIN or len(pts) == 1:
                x, y = pts[0]
                prompts.clicks.append(Click(x, y, class_name, color, label, len(prompts.clicks)))
            elif kind == POLYLINE or (kind == FREEHAND and class_name in squiggle_groups):
                prompts.squiggles.append(
                    Squiggle(tuple(pts), class_name, color, label, len(prompts.squiggles))
                )
            elif kind in (FREEHAND, RECTANGLE, ELLIPSE):
                shape = _outline(kind, pts)
                if shape is None:
                    prompts.skipped.append(f"{label}: degenerate {kind_name} region")
                else:
                    prompts.regions.append(shape)
                    prompts.skipped.append(f"{label}: {kind_name} region is not a prompt (kept as a region)")
            else:
                prompts.skipped.append(f"{label}: {kind_name} is not a prompt")
    return prompts


def read_prompts(path: str | os.PathLike, *, squiggle_groups: Collection[str] | None = None) -> Prompts:
    """Read clicks, squiggles and regions from an Aperio ImageScope XML file.

    Parameters
    ----------
    path : str or os.PathLike
        The XML file (parsed with defusedxml).
    squiggle_groups : collection of str, optional
        Annotation layer names whose freehand regions are squiggles.

    Returns
    -------
    Prompts
        With ``format="imagescope"``; coordinates taken as given (level-0 pixels).
    """
    path = check_exists(path)
    prompts = prompts_from_root(parse_xml(path), str(path), squiggle_groups=squiggle_groups)
    prompts.path = str(path)
    return prompts


def read_imagescope_polygons(path: str | os.PathLike) -> tuple[list[Any], float | None]:
    """Closed outlines of an ImageScope XML file, e.g. MoNuSeg nucleus annotations.

    Parameters
    ----------
    path : str or os.PathLike
        The XML file.

    Returns
    -------
    polygons : list of shapely.geometry.Polygon
        Freehand, rectangle and ellipse regions with 3 or more vertices (ellipses: 2), in file
        order; negative regions are left out. Freehand outlines are returned as drawn and may be
        self-touching (``is_valid`` False); rasterising them is still well defined.
    mpp : float or None
        ``MicronsPerPixel`` of the root element, when present and positive.
    """
    path = check_exists(path)
    where = str(path)
    root = parse_xml(path)
    _check_root(root, where)
    polygons = []
    for a, layer in enumerate(root.findall("Annotation")):
        for r, region in enumerate(layer.iter("Region")):
            kind = region.get("Type") or FREEHAND
            if kind not in (FREEHAND, RECTANGLE, ELLIPSE) or region.get("NegativeROA") == "1":
                continue
            pts = _vertices(region, f"Annotation {a} Region {r}", where)
            shape = _outline(kind, pts)
            if shape is not None:
                polygons.append(shape)
    return polygons, _mpp(root)
