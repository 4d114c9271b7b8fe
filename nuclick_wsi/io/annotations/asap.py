"""ASAP XML: read clicks, squiggles and regions; write and read back instance outlines.

Layout: ``ASAP_Annotations/Annotations/Annotation[Name, Type, PartOfGroup, Color]/Coordinates/
Coordinate[Order, X, Y]`` plus ``ASAP_Annotations/AnnotationGroups/Group[Name, PartOfGroup,
Color]``. Annotation types: Dot, PointSet, Polygon, Spline, Rectangle, Measurement.
``PartOfGroup="None"`` means no group. ASAP places vertices by ``Order`` and refuses a file whose
``PartOfGroup`` names an undeclared group.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import RGB, Click, Instance, Prompts, Squiggle
from nuclick_wsi.io.annotations._common import check_exists, color_for, fmt_number, hex_color, parse_float, parse_hex_color, parse_xml

ROOT_TAG = "ASAP_Annotations"
NO_GROUP = "None"
#: ASAP's default annotation colour, for instances without a class
DEFAULT_COLOR = "#F4FA58"
POINT_TYPES = ("Dot", "PointSet")
OUTLINE_TYPES = ("Polygon", "Spline", "Rectangle")
#: types that are squiggles (gland prompts) when their group is one of ``squiggle_groups``
SQUIGGLE_TYPES = ("Polygon", "Spline", "PointSet")


def _group_colors(root: Any) -> dict[str, RGB | None]:
    groups = {}
    for group in root.iter("Group"):
        name = group.get("Name")
        if name:
            groups[name] = parse_hex_color(group.get("Color"))
    return groups


def _vertices(annotation: Any, label: str, where: str) -> list[tuple[float, float]]:
    """Vertices of an Annotation, sorted by ``Order`` (file order where Order is missing)."""
    rows = []
    for k, coord in enumerate(annotation.iter("Coordinate")):
        try:
            x = parse_float(coord.get("X", ""))
            y = parse_float(coord.get("Y", ""))
        except ValueError as exc:
            raise AnnotationError(
                f"{where}: {label}: coordinate {k} has X={coord.get('X')!r}, Y={coord.get('Y')!r}, "
                "not numbers"
            ) from exc
        order_text = coord.get("Order")
        try:
            order = float(order_text) if order_text not in (None, "") else float(k)
        except ValueError as exc:
            raise AnnotationError(f"{where}: {label}: coordinate {k} has Order={order_text!r}") from exc
        rows.append((order, k, x, y))
    rows.sort()
    return [(x, y) for _, _, x, y in rows]


def prompts_from_root(
    root: Any, where: str, *, squiggle_groups: Collection[str] | None = None
) -> Prompts:
    """Prompts from a parsed ASAP XML root.

    Dot and PointSet -> clicks (class = PartOfGroup unless "None"; colour of the group, else of
    the annotation); Polygon/Spline/PointSet of a group in ``squiggle_groups`` -> squiggles
    (vertices in Order); other Polygon/Spline/Rectangle -> ``regions``; Measurement and unknown types skipped.
    """
    if root.tag != ROOT_TAG:
        raise AnnotationError(f"{where}: not ASAP XML (root element <{root.tag}>, expected <{ROOT_TAG}>)")
    squiggle_groups = set(squiggle_groups or ())
    group_colors = _group_colors(root)
    prompts = Prompts(format="asap")
    annotations = list(root.iter("Annotation"))
    if not annotations:
        raise AnnotationError(f"{where}: no annotations")
    from shapely.geometry import Polygon

    for i, ann in enumerate(annotations):
        name = ann.get("Name") or f"#{i}"
        label = f"Annotation '{name}'"
        kind = ann.get("Type") or ""
        group = ann.get("PartOfGroup") or NO_GROUP
        class_name = None if group == NO_GROUP else group
        color = group_colors.get(group) if class_name else None
        if color is None:
            color = parse_hex_color(ann.get("Color"))
        pts = _vertices(ann, label, where)
        if not pts:
            prompts.skipped.append(f"{label}: no coordinates")
        elif kind in SQUIGGLE_TYPES and class_name is not None and class_name in squiggle_groups:
            if len(pts) < 2:
                prompts.skipped.append(f"{label}: a squiggle needs 2 or more points")
            else:
                prompts.squiggles.append(
                    Squiggle(tuple(pts), class_name, color, label, len(prompts.squiggles))
                )
        elif kind in POINT_TYPES:
            for k, (x, y) in enumerate(pts):
                source = label if len(pts) == 1 else f"{label}, point {k}"
                prompts.clicks.append(Click(x, y, class_name, color, source, len(prompts.clicks)))
        elif kind in OUTLINE_TYPES:
            if len(pts) < 3:
                prompts.skipped.append(f"{label}: a {kind} needs 3 or more points")
            else:
                prompts.regions.append(Polygon(pts))
                prompts.skipped.append(f"{label}: {kind} is not a prompt (kept as a region)")
        else:
            prompts.skipped.append(f"{label}: type {kind!r} is not a prompt")
    return prompts


def read_prompts(path: str | os.PathLike, *, squiggle_groups: Collection[str] | None = None) -> Prompts:
    """Read clicks, squiggles and regions from an ASAP XML file.

    Parameters
    ----------
    path : str or os.PathLike
        The XML file (parsed with defusedxml).
    squiggle_groups : collection of str, optional
        Groups whose Polygon/Spline/PointSet annotations are squiggles rather than regions or clicks.

    Returns
    -------
    Prompts
        With ``format="asap"``. Decimal commas in X/Y ("12,5") are accepted.
    """
    path = check_exists(path)
    prompts = prompts_from_root(parse_xml(path), str(path), squiggle_groups=squiggle_groups)
    prompts.path = str(path)
    return prompts


def read_asap_polygons(path: str | os.PathLike) -> list[dict]:
    """Read outline annotations back from an ASAP XML file.

    Returns
    -------
    list of dict
        One dict per Polygon/Spline/Rectangle annotation, in file order, with keys ``name``,
        ``geometry`` (shapely Polygon, vertices in Order), ``class_name`` (None for group
        "None"), ``color`` (the annotation's ``(r, g, b)``) and ``type``.
    """
    from shapely.geometry import Polygon

    path = check_exists(path)
    where = str(path)
    root = parse_xml(path)
    if root.tag != ROOT_TAG:
        raise AnnotationError(f"{where}: not ASAP XML (root element <{root.tag}>)")
    out = []
    for i, ann in enumerate(root.iter("Annotation")):
        kind = ann.get("Type") or ""
        if kind not in OUTLINE_TYPES:
            continue
        name = ann.get("Name") or f"#{i}"
        pts = _vertices(ann, f"Annotation '{name}'", where)
        if len(pts) < 3:
            continue
        group = ann.get("PartOfGroup") or NO_GROUP
        out.append(
            {
                "name": name,
                "geometry": Polygon(pts),
                "class_name": None if group == NO_GROUP else group,
                "color": parse_hex_color(ann.get("Color")),
                "type": kind,
            }
        )
    return out


def _num(value: float) -> str:
    return repr(fmt_number(value))


def write_asap(instances: Sequence[Instance], path: str | os.PathLike) -> Path:
    """Write instances as ASAP XML Polygon annotations, atomically and pretty-printed.

    Each instance becomes ``<Annotation Name=label Type="Polygon" PartOfGroup=class-or-"None"
    Color="#rrggbb">`` with its exterior ring as ``Coordinate Order="0".."n-1"`` (the closing
    vertex is not repeated). ASAP polygons have no holes: interior rings are dropped. A
    MultiPolygon becomes one Annotation per part, named ``label``, ``label.1``, ``label.2``...
    Every group used is declared under ``AnnotationGroups`` with its colour (the instance colour,
    else the palette colour of the class), since ASAP refuses undeclared groups.

    Parameters
    ----------
    instances : sequence of Instance
        The objects, written in the given order.
    path : str or os.PathLike
        Output file.

    Returns
    -------
    Path
        The written file.
    """
    root = ET.Element(ROOT_TAG)
    annotations = ET.SubElement(root, "Annotations")
    groups: dict[str, str] = {}
    for inst in instances:
        rgb = color_for(inst.class_name, inst.color)
        color = hex_color(rgb) if rgb is not None else DEFAULT_COLOR
        group = NO_GROUP if inst.class_name is None else inst.class_name
        if inst.class_name is not None:
            groups.setdefault(inst.class_name, color)
        geom = inst.geometry
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        for k, part in enumerate(parts):
            name = str(inst.label) if k == 0 else f"{inst.label}.{k}"
            ann = ET.SubElement(
                annotations,
                "Annotation",
                {"Name": name, "Type": "Polygon", "PartOfGroup": group, "Color": color},
            )
            coords = ET.SubElement(ann, "Coordinates")
            ring = list(part.exterior.coords)
            if len(ring) > 1 and ring[0] == ring[-1]:
                ring = ring[:-1]
            for order, (x, y, *_) in enumerate(ring):
                ET.SubElement(coords, "Coordinate", {"Order": str(order), "X": _num(x), "Y": _num(y)})
    group_root = ET.SubElement(root, "AnnotationGroups")
    for name, color in groups.items():
        group = ET.SubElement(group_root, "Group", {"Name": name, "PartOfGroup": NO_GROUP, "Color": color})
        ET.SubElement(group, "Attributes")
    ET.indent(root, space="\t")
    data = b'<?xml version="1.0"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path
