"""The instance table beside a label store (``instances.csv``): one row per instance, written and read back."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


__all__ = ["INSTANCE_COLUMNS", "INSTANCE_TABLE_NAME", "read_instance_table", "write_instance_table"]

INSTANCE_TABLE_NAME = "instances.csv"
#: Columns of the instance table, in file order. x, y: the click; centroid_x/y: of the instance.
INSTANCE_COLUMNS = (
    "label",
    "prompt_index",
    "class_name",
    "x",
    "y",
    "centroid_x",
    "centroid_y",
    "area_px",
    "area_um2",
    "score",
    "confidence",
    "kind",
)
_INT_COLUMNS = frozenset({"label", "prompt_index"})
_STR_COLUMNS = frozenset({"class_name", "kind"})


def _format_cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in _INT_COLUMNS:
        return str(int(value))
    if column in _STR_COLUMNS:
        return str(value)
    return repr(float(value))


def _parse_cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _INT_COLUMNS:
        return int(text)
    if column in _STR_COLUMNS:
        return text
    return float(text)


def _rows(table: Iterable[Mapping[str, Any]] | Any) -> Iterable[Mapping[str, Any]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a pandas DataFrame
        return table.to_dict("records")
    return table


def write_instance_table(path: str | os.PathLike, table: Iterable[Mapping[str, Any]] | Any) -> None:
    """Write an instance table as CSV (via a temporary file and a rename).

    Parameters
    ----------
    path : path-like
        The CSV file.
    table : iterable of mappings, or pandas DataFrame
        Rows with keys among :data:`INSTANCE_COLUMNS`; ``label`` is required, a missing or None
        value is written as an empty cell, other keys are ignored. Floats are written exactly
        (``repr``), so :func:`read_instance_table` gives them back unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(INSTANCE_COLUMNS)
        for i, row in enumerate(_rows(table)):
            if row.get("label") is None:
                raise ValueError(f"instance table row {i} has no label")
            writer.writerow([_format_cell(c, row.get(c)) for c in INSTANCE_COLUMNS])
    os.replace(tmp, path)


def read_instance_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the instance table of a store (or a CSV file written by :func:`write_instance_table`).

    Parameters
    ----------
    path : path-like
        Folder of the store, or the CSV file itself.

    Returns
    -------
    list of dict
        One dict per instance with the keys of :data:`INSTANCE_COLUMNS`: ``label`` and
        ``prompt_index`` int, ``class_name`` and ``kind`` str, the others float; empty cells None.
        ``pandas.DataFrame(rows)`` makes a data frame of it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INSTANCE_TABLE_NAME
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(INSTANCE_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: instance table lacks columns {sorted(missing)}")
        return [{c: _parse_cell(c, row[c]) for c in INSTANCE_COLUMNS} for row in reader]


