"""Output paths of a slide and whether they are complete and fresh (stale ones: :mod:`nuclick_wsi.outputs.safety`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.store.labels import is_complete

#: polygon output formats and their file suffixes
POLYGON_SUFFIXES = {"qupath": ".geojson", "asap": ".xml", "geoparquet": ".parquet"}


def slide_stem(path: str | os.PathLike) -> str:
    """The slide's name without its extension(s) (``a.ome.tiff`` -> ``a``)."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def output_paths(out_dir: str | os.PathLike, stem: str, formats: Sequence[str], gzip: bool = False, *,
                 glands: bool = False) -> dict[str, Path]:
    """Final output paths for a slide stem (``glands``: with ``S.glands.zarr``, for files with squiggles)."""
    out = Path(out_dir)
    paths = {"labels": out / f"{stem}.labels.zarr", "report": out / f"{stem}.report.json"}
    if glands:
        paths["glands"] = out / f"{stem}.glands.zarr"
    for f in formats:
        if f not in POLYGON_SUFFIXES:
            raise NuclickError(f"unknown output format {f!r} (choose from {', '.join(POLYGON_SUFFIXES)})")
        paths[f] = out / f"{stem}{POLYGON_SUFFIXES[f]}{'.gz' if gzip and f == 'qupath' else ''}"
    return paths


def outputs_complete(paths: dict[str, Path], ngff: str | None = None) -> bool:
    """True when every output exists and the label store is complete (the report is written last);
    with ``ngff``, only label stores of that NGFF version count."""
    return (all(p.exists() for p in paths.values()) and is_complete(paths["labels"], ngff)
            and ("glands" not in paths or is_complete(paths["glands"], ngff)))


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def outputs_fresh(paths: dict[str, Path], inputs: Sequence[Path], ngff: str | None = None, *,
                  clicks: Path | None = None) -> bool:
    """Outputs complete (label stores of NGFF ``ngff`` if given), and written after every input last
    changed (else: redo; outputs of the other NGFF version are redone, as a change of formats is).
    With ``clicks``: also made from that file as it is now (the report's ``points.sha256``), since a
    file saved again while the run read the earlier one is older than the outputs yet not done."""
    if not outputs_complete(paths, ngff):
        return False
    try:
        done = paths["report"].stat().st_mtime
        if not all(p.stat().st_mtime <= done for p in inputs):
            return False
        if clicks is None:
            return True
        used = (json.loads(paths["report"].read_text(encoding="utf-8")).get("points") or {}).get("sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return used is None or used == file_sha256(clicks)  # None: a report of an older nuclick-wsi

