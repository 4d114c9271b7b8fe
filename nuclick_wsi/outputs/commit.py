"""Writing a run's outputs under temporary names, then putting them in place with the report last."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nuclick_wsi import __version__
from nuclick_wsi._util.fs import atomic_output, remove_path, replace_file
from nuclick_wsi.io.annotations import write_asap, write_geoparquet, write_qupath
from nuclick_wsi.outputs.safety import commit_marker
from nuclick_wsi.records import Instance


def write_polygons(instances: list[Instance], temps: dict[str, Path], *, object_type: str, gzip: bool,
                   mpp: float, memo: dict | None = None) -> None:
    """The polygon outputs ``temps`` names (``qupath``, ``asap``, ``geoparquet``); ``memo``: the QuPath
    file's entries of a watching process's :class:`~nuclick_wsi.io.annotations.qupath_writer.FeatureMemory`."""
    if "qupath" in temps:
        write_qupath(instances, temps["qupath"], object_type=object_type, gzip=gzip, memo=memo)
    if "asap" in temps:
        write_asap(instances, temps["asap"])
    if "geoparquet" in temps:
        write_geoparquet(instances, temps["geoparquet"], mpp=mpp)


def commit_outputs(temps: dict[str, Path], paths: dict[str, Path], report: dict[str, Any], *,
                   stale: Iterable[Path] = (), others: Iterable[Path] = ()) -> None:
    """Write the report, then rename every temporary to its final path, the report last; then remove
    ``stale`` (outputs of the earlier run that this one does not write).

    The report marks completion: the old one goes first, the new one comes in last, so a kill in
    between leaves a folder that reads as incomplete and is redone. Before the old report goes, a
    marker (:func:`~nuclick_wsi.outputs.safety.commit_marker`) names every output and ``stale`` and
    ``others`` file (the QC page): they stay known as this tool's, so the run after a kill does not
    refuse them as a user's files. The marker stays after the commit, naming the outputs and
    ``others`` (no longer ``stale``): a report deleted by someone else (Snakemake deletes a job's
    declared output, the report, before it runs the job again) leaves outputs still known as ours.
    """
    stale = list(stale)
    with atomic_output(temps["report"]) as tmp:
        tmp.write_text(report_text(report))
    write_marker(paths["report"], [*paths.values(), *stale, *others])
    remove_path(paths["report"])
    for key in [k for k in temps if k != "report"] + ["report"]:
        replace_file(temps[key], paths[key])
    for old in stale:
        remove_path(old)
    write_marker(paths["report"], [*paths.values(), *others])


def write_marker(report: Path, files: Iterable[Path]) -> Path:
    """Write the commit marker beside ``report`` naming ``files`` (see :func:`commit_outputs`); return its path."""
    marker = commit_marker(report)
    with atomic_output(marker) as tmp:
        names = sorted({p.name for p in files})
        tmp.write_text(json.dumps({"nuclick_wsi_version": __version__, "names": names}, indent=1) + "\n")
    return marker


def report_text(report: dict[str, Any]) -> str:
    """The report as indented JSON, each record of a top-level list of records (``clicks``) on one line.

    One line per click reads well and is fast: json's indenting encoder is pure Python (0.2 s for
    5,000 clicks, a tenth of a small rerun), a record on one line goes through its C encoder.
    """
    items = list(report.items())
    lines = ["{"]
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows = ",\n".join("  " + json.dumps(v) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n ") + comma)
    lines.append("}")
    return "\n".join(lines) + "\n"
