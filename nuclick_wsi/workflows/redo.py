"""When ``batch`` and ``qupath run`` redo a slide whose outputs are complete and fresh: ``--full``,
or an earlier run asked for something else (:mod:`nuclick_wsi.outputs.asked`). The redo is an
ordinary ``segment`` run, incremental where its own fingerprint allows."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from nuclick_wsi._util.text import first_line
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.models import Models
from nuclick_wsi.outputs.asked import asked_change, asked_section


def redo_reason(report_path: Path, opts, models: Models, qc_files: Iterable[Path]) -> str | None:
    """Why a slide whose outputs are complete and fresh is segmented again with ``opts``
    (SegmentOptions) and ``models``, in words; None: it is done. ``qc_files``: its QC page and
    review list, which ``opts.qc`` asks for.

    A report without the ``asked`` section (an older nuclick-wsi) keeps the older rule: complete
    and fresh outputs are done, whatever the options.
    """
    if opts.full:
        return "--full"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        old = report.get("asked")
    except (OSError, ValueError, AttributeError):
        return "report unreadable"
    if not isinstance(old, dict):
        return None  # an older nuclick-wsi's report: done, as it was then
    try:  # only the kinds of model the earlier run used (the clicks file is the same)
        nuclei = models.get("nuclei") if old.get("nuclei") is not None else None
        gland = models.get("gland") if old.get("gland") is not None else None
    except NuclickError as exc:  # the run says it again, as the slide's error
        return f"model not loaded ({first_line(exc)})"
    why = asked_change(report, asked_section(opts, nuclei, gland), opts.formats, opts.gzip)
    if why is None and opts.qc and "qupath" in opts.formats and not all(p.exists() for p in qc_files):
        why = "QC page missing (--qc)"
    return why
