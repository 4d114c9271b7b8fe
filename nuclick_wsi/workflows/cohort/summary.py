"""Results of a batch: per-row states, the summary CSV and the table shown in the terminal."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nuclick_wsi.workflows.cohort.locks import FileLock, LOCK_SUFFIX, remove_temporaries
from nuclick_wsi.workflows.cohort.manifest import SUMMARY_NAME, ManifestRow
from nuclick_wsi._util.fs import atomic_output


STATUSES = ("segmented", "complete", "failed", "running", "pending")
SUMMARY_COLUMNS = ("stem", "status", "clicks", "segmented", "skipped", "seconds", "slide", "points", "error")


@dataclass
class SlideResult:
    """A row's state after a batch run."""

    row: ManifestRow
    status: str  #: one of :data:`STATUSES`
    clicks: int | None = None
    segmented: int | None = None
    seconds: float | None = None
    error: str = ""
    holder: str = ""  #: for ``running``: host:pid of the process holding the slide
    redone: str = ""  #: for ``segmented``: why outputs that were complete were redone ("threshold changed")

    def as_summary_row(self) -> dict[str, Any]:
        skipped = None if self.clicks is None or self.segmented is None else self.clicks - self.segmented
        return {"stem": self.row.stem, "status": self.status, "clicks": self.clicks, "segmented": self.segmented,
                "skipped": skipped, "seconds": None if self.seconds is None else round(self.seconds, 2),
                "slide": str(self.row.slide), "points": str(self.row.points), "error": self.error}


@dataclass
class BatchResult:
    """Every manifest row's state (manifest order), and where the summary went."""

    results: list[SlideResult]
    selected: list[str]  #: stems this process was asked to handle
    summary_path: Path | None = None

    def count(self, status: str, selected_only: bool = False) -> int:
        sel = set(self.selected)
        return sum(r.status == status and (not selected_only or r.row.stem in sel) for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        """Failures among the rows this process handled."""
        sel = set(self.selected)
        return [r for r in self.results if r.status == "failed" and r.row.stem in sel]

    @property
    def ok(self) -> bool:
        return not self.failed


def write_summary(out_dir: str | os.PathLike, results: Sequence[SlideResult], *, stale_after: float = 600.0) -> Path | None:
    """Write ``OUT/batch-summary.csv`` (atomically, under its own lock); None if the lock stayed busy."""
    out = Path(out_dir)
    final = out / SUMMARY_NAME
    lock = FileLock(out / f"{SUMMARY_NAME}{LOCK_SUFFIX}", stale_after)
    if not lock.acquire(timeout=60.0, poll=0.1):
        return None
    try:
        remove_temporaries(out, {SUMMARY_NAME, f"{SUMMARY_NAME}{LOCK_SUFFIX}"})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if v is None else v) for k, v in r.as_summary_row().items()})
        with atomic_output(final) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
    finally:
        lock.release()
    return final


def format_summary(results: Sequence[SlideResult], max_rows: int = 40) -> str:
    """A plain-text table of the results (only counts and the rows not done when there are many)."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    shown = list(results)
    note = ""
    if len(shown) > max_rows:
        shown = [r for r in results if r.status in ("failed", "running", "pending")][:max_rows]
        note = f"({len(results) - len(shown)} more rows not shown: see {SUMMARY_NAME})"
    cols = ("stem", "status", "clicks", "segmented", "seconds", "error")
    table = [cols] + [tuple("" if (v := r.as_summary_row()[c]) is None else str(v) for c in cols) for r in shown]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)).rstrip()
             for row in table]
    if note:
        lines.append(note)
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "no rows")
    return "\n".join(lines)
