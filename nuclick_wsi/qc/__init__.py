"""Quality control: look before you import.

From the outputs ``segment`` already wrote (never the model), :func:`write_qc` makes

- ``S.qc.html``: one self-contained page (images embedded): overview with every outline, density,
  a gallery of crops (random sample and least confident), plots, and the run;
- ``S.review.geojson``: the doubtful outlines as QuPath annotations of class "NuClick review"
  with the reason in their name (see :mod:`.review`).

:func:`write_index` writes ``OUT/index.html`` (one row per slide) for ``batch`` and ``qupath run``;
:func:`rebuild` serves ``nuclick-wsi report OUT/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.errors import OutputError
from nuclick_wsi.qc.data import QcInputs, load_outputs
from nuclick_wsi.qc.review import REVIEW_CLASS, ReviewOptions, review, review_features, write_review

__all__ = ["REVIEW_CLASS", "QcInputs", "ReviewOptions", "index_row", "load_outputs", "qc_paths",
           "rebuild", "refuse_foreign_index", "write_index", "write_qc"]

INDEX_NAME = "index.html"


def qc_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Where :func:`write_qc` writes: ``html`` (S.qc.html) and ``review`` (S.review.geojson)."""
    out = Path(out_dir)
    return {"html": out / f"{stem}.qc.html", "review": out / f"{stem}.review.geojson"}


def write_qc(out_dir: str | Path, stem: str, *, options: ReviewOptions | None = None) -> dict[str, Path]:
    """Write ``S.qc.html`` and ``S.review.geojson`` from the outputs of ``segment`` in ``out_dir``.

    Reads ``S.report.json``, ``S.labels.zarr`` (instance table and pyramid), ``S.geojson`` and the
    slide named in the report (opened in the run's frame with the run's reader). Memory stays flat:
    one low-resolution read for the overview, one pyramid level, region reads for the crops.

    Returns
    -------
    dict
        ``html``, ``review``: the written files.

    Raises
    ------
    NuclickError
        An output or the slide is missing or unreadable (one line naming it).
    """
    from nuclick_wsi.qc.page import build_page  # matplotlib is imported only when a page is built

    t0 = time.perf_counter()
    inputs = load_outputs(out_dir, stem)
    reasons = review(inputs, options)
    paths = qc_paths(out_dir, stem)
    features = review_features(inputs, reasons)
    text = build_page(inputs, reasons, len(features), t0)
    write_review(paths["review"], features)
    with atomic_output(paths["html"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return paths


def index_row(out_dir: str | Path, stem: str, status: str, *, seconds: float | None = None,
              error: str = "", report_href: str | None = None) -> dict[str, Any]:
    """One row of ``index.html`` from what is in ``out_dir`` for ``stem``."""
    out = Path(out_dir)
    row: dict[str, Any] = {"stem": stem, "status": status, "seconds": seconds, "error": error}
    try:
        rep = json.loads((out / f"{stem}.report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rep = None
    if rep and status not in ("failed", "pending", "running"):
        t = rep.get("totals") or {}
        row.update(clicks=t.get("clicks"), segmented=t.get("segmented"), skipped=t.get("skipped"))
        if row["seconds"] is None:
            row["seconds"] = (rep.get("timings_s") or {}).get("wall")
        mpp = (rep.get("mpp") or {}).get("slide")
        areas = sorted(c["area_px"] for c in rep.get("clicks", []) if c.get("status") == "segmented")
        if areas and mpp:
            mid = len(areas) // 2
            med = areas[mid] if len(areas) % 2 else (areas[mid - 1] + areas[mid]) / 2
            row["median_area_um2"] = med * mpp ** 2
    paths = qc_paths(out, stem)
    if paths["review"].is_file():
        try:
            row["flagged"] = len(json.loads(paths["review"].read_text(encoding="utf-8"))["features"])
        except (OSError, ValueError, KeyError):
            pass
    if paths["html"].is_file() and status not in ("failed", "pending", "running"):  # else: an earlier run's page
        row["report"] = report_href or paths["html"].name
    return row


#: what every ``index.html`` :func:`write_index` writes holds (and a page of anyone else hardly does)
INDEX_SIGNATURE = ('<table id="slides">', 'data-qc="summary"')


def refuse_foreign_index(out_dir: str | Path) -> None:
    """Raise :class:`~nuclick_wsi.errors.OutputError` when ``OUT/index.html`` exists and is not a page
    :func:`write_index` wrote (a user's own index of the folder): before any work, never replaced."""
    path = Path(out_dir) / INDEX_NAME
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(4 * 2**20)
    except OSError:
        text = ""
    if not all(mark in text for mark in INDEX_SIGNATURE):
        raise OutputError(f"{path} exists and was not written by nuclick-wsi; move it or choose another -o")


def write_index(out_dir: str | Path, rows: list[dict[str, Any]], title: str = "nuclick-wsi results") -> Path:
    """Write ``OUT/index.html`` (sortable, failures first) from :func:`index_row` rows."""
    from nuclick_wsi.qc.html import index_page

    path = Path(out_dir) / INDEX_NAME
    with atomic_output(path) as tmp:
        tmp.write_text(index_page(title, rows), encoding="utf-8")
    return path


def rebuild(out_dir: str | Path, stems: list[str] | None = None, *, log=None) -> tuple[list[Path], list[str]]:
    """``nuclick-wsi report OUT/``: rebuild every slide's QC from its outputs, then ``index.html``.

    Returns the written paths and one line per slide that failed.
    """
    from nuclick_wsi.errors import NuclickError

    out = Path(out_dir)
    refuse_foreign_index(out)
    found = sorted(p.name[: -len(".report.json")] for p in out.glob("*.report.json"))
    stems = list(stems) if stems else found
    written, failures, rows = [], [], []
    for stem in stems:
        t0 = time.perf_counter()
        try:
            written.extend(write_qc(out, stem).values())
            rows.append(index_row(out, stem, "complete"))
            done = "report"
        except NuclickError as exc:
            failures.append(f"{stem}: {exc}")
            rows.append(index_row(out, stem, "failed", error=str(exc).splitlines()[0]))
            done = "FAILED"
        if log:
            log(f"{stem}: {done} ({time.perf_counter() - t0:.1f} s)")
    rows += [index_row(out, stem, "complete") for stem in found if stem not in stems]  # --stem: the rest stay listed
    for p in out.glob("*.failed.json"):
        stem = p.name[: -len(".failed.json")]
        if stem not in stems and stem not in found:
            try:
                err = json.loads(p.read_text(encoding="utf-8")).get("error", "")
            except (OSError, ValueError):
                err = ""
            rows.append(index_row(out, stem, "failed", error=err))
    if rows:
        written.append(write_index(out, rows))
    return written, failures
