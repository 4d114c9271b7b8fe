"""Annotation files: read prompts (QuPath GeoJSON, ASAP XML, ImageScope XML, CSV), write outlines.

Coordinates are level-0 pixels in QuPath's frame; ASAP, ImageScope and CSV coordinates are
taken as given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import Prompts
from nuclick_wsi.io.annotations import asap, imagescope, qupath
from nuclick_wsi.io.annotations import csv as csv_clicks
from nuclick_wsi.io.annotations._common import (GEOJSON_SUFFIXES, GZIP_MAGIC, UTF16_BOMS, ZIP_MAGIC, check_exists,
                                                default_color, parse_xml, read_head)
from nuclick_wsi.io.annotations.asap import read_asap_polygons, write_asap
from nuclick_wsi.io.annotations.geoparquet import write_geoparquet
from nuclick_wsi.io.annotations.imagescope import read_imagescope_polygons
from nuclick_wsi.io.annotations.qupath import read_qupath_polygons
from nuclick_wsi.io.annotations.qupath_writer import write_qupath

__all__ = [
    "default_color",
    "detect_format",
    "read_asap_polygons",
    "read_imagescope_polygons",
    "read_prompts",
    "read_qupath_polygons",
    "write_asap",
    "write_geoparquet",
    "write_qupath",
]

FORMATS = ("qupath", "asap", "imagescope", "csv")
_JSON_SCALAR = re.compile(rb'^(?:-?[0-9][0-9.eE+-]*|"(?:[^"\\]|\\.)*"|true|false|null)\s*$')
_XML_ROOT = re.compile(rb"<\s*([A-Za-z_][\w.:-]*)")
_XML_SKIP = re.compile(rb"<\?.*?\?>|<!--.*?-->|<!DOCTYPE(?:[^\[>]|\[.*?\])*>", re.S)


def detect_format(path: str | os.PathLike) -> str:
    """Recognise an annotation file from its content.

    Gzip and zip (magic bytes), text (UTF-8, Latin-1 or UTF-16 with a BOM) starting with ``{`` or ``[`` and a ``.geojson`` / ``.json``
    holding one JSON number, string or literal are QuPath GeoJSON; text
    starting with ``<`` is XML, told apart by its root element (``ASAP_Annotations`` -> "asap",
    ``Annotations`` -> "imagescope"); anything else is CSV.

    Returns
    -------
    str
        One of "qupath", "asap", "imagescope", "csv".

    Raises
    ------
    AnnotationError
        For a missing or empty file, or XML with another root element.
    """
    path = check_exists(path)
    head = read_head(path)
    if head[:2] == GZIP_MAGIC or head[:4] == ZIP_MAGIC:
        return "qupath"
    if head[:2] in UTF16_BOMS:  # UTF-16 text: look at it as UTF-8 (the readers decode the whole file)
        head = head.decode("utf-16", "ignore").encode("utf-8")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise AnnotationError(f"{path}: empty file")
    if text[:1] in (b"{", b"[") or (path.suffix.lower() in GEOJSON_SUFFIXES and _JSON_SCALAR.match(text)):
        return "qupath"  # a .geojson holding a JSON number or string is a GeoJSON error, not a CSV one
    if text[:1] == b"<":
        m = _XML_ROOT.search(_XML_SKIP.sub(b"", text))
        tag = m.group(1).decode("ascii", "replace") if m else None
        if tag is None or b"<!DOCTYPE" in text or b"<!ENTITY" in text:
            tag = parse_xml(path).tag  # the parser refuses entities and names broken lines
        if tag == asap.ROOT_TAG:
            return "asap"
        if tag == imagescope.ROOT_TAG:
            return "imagescope"
        raise AnnotationError(
            f"{path}: XML with root element <{tag}> is neither ASAP (<{asap.ROOT_TAG}>) nor "
            f"Aperio ImageScope (<{imagescope.ROOT_TAG}>)"
        )
    return "csv"


def read_prompts(path: str | os.PathLike, *, squiggle_groups: Collection[str] | None = None) -> Prompts:
    """Read clicks and squiggles from an annotation file, recognising its format by content.

    Parameters
    ----------
    path : str or os.PathLike
        QuPath GeoJSON (``.geojson``, ``.json``, gzip, or a zip holding one GeoJSON), ASAP XML,
        Aperio ImageScope XML, or CSV of ``x,y[,class]``.
    squiggle_groups : collection of str, optional
        ASAP groups / ImageScope layer names whose outlines are squiggles (gland prompts) rather
        than regions. QuPath lines are squiggles whatever their class; CSV holds clicks only.

    Returns
    -------
    Prompts
        ``format``, ``path`` and ``skipped`` (one line per object not taken as a prompt, and why)
        filled.

    Raises
    ------
    AnnotationError
        For a file that cannot be read as annotations; the message names the file and, where it
        applies, the feature, annotation or line.
    """
    fmt = detect_format(path)
    if fmt == "qupath":
        return qupath.read_prompts(path)
    if fmt == "asap":
        return asap.read_prompts(path, squiggle_groups=squiggle_groups)
    if fmt == "imagescope":
        return imagescope.read_prompts(path, squiggle_groups=squiggle_groups)
    return csv_clicks.read_prompts(path)
