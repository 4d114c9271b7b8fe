"""CSV clicks: ``x,y[,class]`` per line, with or without a header.

The delimiter is a tab, a semicolon or a comma, chosen from the first data line (tab, then
semicolon, then comma). With a tab or semicolon delimiter, decimal commas are accepted. A header
is recognised when neither of its first two fields is a number; header names ``x``, ``y`` (also
``Centroid X px`` and ``X (px)``, as QuPath and spreadsheets name pixel columns) and ``class`` (or
``class_name``, ``label``, ``name``) pick the columns, otherwise columns are taken in order. A
header that puts a coordinate in µm (QuPath's measurement export: ``Centroid X µm``) is an
error: clicks are level-0 pixels, and reading µm as pixels would put every click in the wrong
place. Blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import csv as _csv
import os
import re

from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import Click, Prompts
from nuclick_wsi.io.annotations._common import check_exists, decode_text, parse_float, read_head

CLASS_HEADERS = ("class", "class_name", "classname", "label", "name")
#: a header naming the x (y) column in pixels: "x", "X px", "x (px)", "Centroid X", "centroid_x_px"
_PIXEL_COLUMN = r"^(?:centroid[ _]?)?{}(?:[ _]?\(?(?:px|pixels?)\)?)?$"
#: a header naming a coordinate in micrometres: "Centroid X µm" (micro sign or Greek mu), "x_um", "Y (microns)"
_MICRON_COLUMN = re.compile(r"^(?:centroid[ _]?)?[xy](?:[ _]?\(?(?:[µμu]m|microns?|micrometers?)\)?)$")


def _delimiter(line: str) -> str:
    for delim in ("\t", ";"):
        if delim in line:
            return delim
    return ","


def _is_number(text: str) -> bool:
    try:
        parse_float(text)
    except ValueError:
        return False
    return True


def prompts_from_text(text: str, where: str) -> Prompts:
    """Clicks from CSV text; ``where`` names the file in messages.

    Raises
    ------
    AnnotationError
        For a short row or a non-numeric coordinate (naming the 1-based line number), or a file
        without any data row.
    """
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)]
    content = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not content:
        raise AnnotationError(f"{where}: empty CSV file (no clicks)")
    delim = _delimiter(content[0][1])
    rows = [(n, [f.strip() for f in fields]) for (n, _), fields in zip(
        content, _csv.reader((line for _, line in content), delimiter=delim, skipinitialspace=True)
    )]
    ix, iy, icls = 0, 1, 2
    first_n, first = rows[0]
    if len(first) >= 2 and not (_is_number(first[0]) or _is_number(first[1])):
        names = [f.lower() for f in first]
        microns = [f for f, name in zip(first, names) if _MICRON_COLUMN.match(name)]
        if microns:
            raise AnnotationError(f"{where}: line {first_n}: column(s) {', '.join(map(repr, microns))} are in µm; "
                                  "clicks are read in level-0 pixels (export pixel coordinates, or divide by the "
                                  "slide's µm/px)")
        col_x = next((k for k, name in enumerate(names) if re.match(_PIXEL_COLUMN.format("x"), name)), None)
        col_y = next((k for k, name in enumerate(names) if re.match(_PIXEL_COLUMN.format("y"), name)), None)
        if col_x is not None and col_y is not None:
            ix, iy = col_x, col_y
            icls = next((names.index(c) for c in CLASS_HEADERS if c in names), None)
        rows = rows[1:]
        if not rows:
            raise AnnotationError(f"{where}: CSV has a header (line {first_n}) but no clicks")
    prompts = Prompts(format="csv")
    for n, fields in rows:
        need = max(ix, iy) + 1
        if len(fields) < need:
            raise AnnotationError(
                f"{where}: line {n}: expected x{delim}y[{delim}class], found {len(fields)} field(s)"
            )
        try:
            x, y = parse_float(fields[ix]), parse_float(fields[iy])
        except ValueError as exc:
            raise AnnotationError(
                f"{where}: line {n}: x={fields[ix]!r}, y={fields[iy]!r} are not numbers"
            ) from exc
        cls = fields[icls] if icls is not None and icls < len(fields) and fields[icls] else None
        prompts.clicks.append(Click(x, y, cls, None, f"line {n}", len(prompts.clicks)))
    return prompts


def read_prompts(path: str | os.PathLike) -> Prompts:
    """Read clicks from a CSV file of ``x,y[,class]`` rows (level-0 pixels, taken as given).

    Parameters
    ----------
    path : str or os.PathLike
        The CSV file.

    Returns
    -------
    Prompts
        With ``format="csv"``; ``source`` of each click is ``"line N"`` (1-based).
    """
    path = check_exists(path)
    prompts = prompts_from_text(decode_text(read_head(path, -1), path), str(path))
    prompts.path = str(path)
    return prompts
