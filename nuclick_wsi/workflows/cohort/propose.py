"""``batch --propose``: proposed clicks for every manifest row, before any click exists.

Each row's slide gets ``OUT/proposals/<stem>.proposals.geojson`` (:func:`nuclick_wsi.proposals.propose`),
under a lock file of its own (``OUT/proposals/<stem>.lock``), so several processes may share the
manifest; a row whose proposals are newer than its slide is skipped, and one that fails is reported
while the others go on. The ``points`` column is not read: the pathologist corrects the proposals and
exports them as the row's clicks for the usual ``batch``; the ``weights`` column (a NuClick model) is
not used either.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from nuclick_wsi._util.fs import ensure_writable_dir
from nuclick_wsi._util.text import first_line
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.proposals import ProposeOptions, propose, proposals_path
from nuclick_wsi.workflows.cohort.locks import LOCK_SUFFIX, FileLock
from nuclick_wsi.workflows.cohort.manifest import Manifest, ManifestRow, read_manifest, select_rows

PROPOSALS_DIR = "proposals"


@dataclass
class ProposeRow:
    """What ``batch --propose`` did with one row."""

    stem: str
    status: str  #: "proposed", "complete" (fresh proposals there), "running" (another process) or "failed"
    proposals: int | None = None
    seconds: float = 0.0
    error: str = ""


def _fresh(out: Path, slide: Path) -> bool:
    try:
        return out.stat().st_mtime >= slide.stat().st_mtime
    except OSError:
        return False


def propose_row(row: ManifestRow, folder: Path, options: ProposeOptions, weights: str | None,
                stale_after: float = 600.0) -> ProposeRow:
    """Propose clicks for one row unless its proposals are fresh or another process holds it."""
    lock = FileLock(folder / f"{row.stem}{LOCK_SUFFIX}", stale_after)
    if not lock.acquire():
        return ProposeRow(row.stem, "running")
    try:
        if _fresh(proposals_path(folder, row.stem), Path(row.slide)):
            return ProposeRow(row.stem, "complete")
        t0 = time.perf_counter()
        opts = replace(options, mpp=row.mpp if row.mpp is not None else options.mpp,
                       bounds_offset=options.bounds_offset if row.bounds_offset is None else row.bounds_offset)
        try:
            res = propose(row.slide, folder, weights=weights, options=opts, stem=row.stem)
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the others
            return ProposeRow(row.stem, "failed", seconds=time.perf_counter() - t0,
                              error=first_line(exc, typed=not isinstance(exc, NuclickError)))
        return ProposeRow(row.stem, "proposed", res.summary["proposals"], time.perf_counter() - t0)
    finally:
        lock.release()


def run_propose_batch(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike, options: ProposeOptions,
                      *, weights: str | None = None, only=(), task_index: int | None = None, rows_per_task: int = 1,
                      log: Callable[[str], None] | None = None) -> list[ProposeRow]:
    """Every selected row's proposals into ``OUT/proposals/``; one :class:`ProposeRow` per row, in order."""
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = select_rows(man, only=only, task_index=task_index, rows_per_task=rows_per_task)
    folder = ensure_writable_dir(Path(out_dir) / PROPOSALS_DIR)
    say = log or (lambda _m: None)
    out = []
    for k, row in enumerate(rows, start=1):
        res = propose_row(row, folder, options, weights)
        detail = {"proposed": f"{res.proposals} proposals in {res.seconds:.1f} s", "complete": "proposals fresh, skipped",
                  "running": "held by another process, left to it"}.get(res.status, f"FAILED: {res.error}")
        say(f"[{k}/{len(rows)}] {row.stem}: {detail}")
        out.append(res)
    return out
