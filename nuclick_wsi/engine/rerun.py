"""Incremental reruns: which earlier run a ``segment`` may build on, and what it may take from it.

A run writes, inside its nucleus label store, its id table and every click's piece (what the
network and post-processing made of the click's patch, before stitching; :mod:`nuclick_wsi.store.rerun`),
the traced outlines of its final masks, and a fingerprint of everything a piece depends on besides
the click's own patch: the slide file (size and modification time), reader and frame, the slide's
um/px, the model (a hash of its weights, architecture, patch size, um/px and thresholds), the
device, precision, torch version, CPU kernels, threads and batch size, and the nuclick-wsi version.
A rerun into the same folder then

* keeps the id table whenever the earlier run is complete and its state intact (:class:`~nuclick_wsi.engine.identity.IdTable`);
* reuses a click's piece only when the fingerprint is the same and the click's signature (its
  exact position and the clicks in its exclusion map, :func:`~nuclick_wsi.engine.clicks.signature`,
  and on a resampled slide the box of the read its patch is cut from) is one the earlier run
  computed, or, on a resampled slide, when its content key (the same plus the exact pixels of its
  patch, :func:`~nuclick_wsi.engine.clicks.content_signature`) is: an edit that widens a region's
  read recomputes only the clicks whose patch pixels or exclusion map it changed; every other
  click is recomputed;
* stitches every piece an edit can reach, reused or new, in the order a from-scratch run uses
  (regions row by row, clicks by y, x, then id), so the overlap rule resolves every contested pixel
  as it would there, and takes the earlier final instance of every other piece without stitching it
  (:mod:`nuclick_wsi.engine.reuse`); the outputs are the bytes a from-scratch run with the same id
  table writes; an outline is traced again only when its final mask changed;
* copies the label-store chunk files whose labels did not change from the earlier store instead of
  encoding them again (:mod:`nuclick_wsi.store.chunks`; the same bytes).

``--full`` (``SegmentOptions.full``) starts a fresh id table and recomputes everything.
Glands (squiggles) are always recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nuclick_wsi import __version__
from nuclick_wsi.engine.identity import IdTable
from nuclick_wsi.model.runtime import openvino_version
from nuclick_wsi.outputs.asked import model_identity
from nuclick_wsi.store.chunks import ChunkTable
from nuclick_wsi.store.labels import is_complete
from nuclick_wsi.store.rerun import PackedPiece, RerunState, read_state

log = logging.getLogger("nuclick_wsi")

#: readable names of the fingerprint's parts, for the reason a rerun is full
WHAT = {"nuclick_wsi": "nuclick-wsi version", "slide": "slide file", "mpp": "slide um/px",
        "model.weights_sha256": "model weights", "model.mpp": "model um/px", "model.postprocess": "thresholds",
        "model": "model", "compute": "device, precision, runtime, test-time augmentation or CPU kernels", "batch_size": "batch size"}


def fingerprint(slide, slide_path, mpp: float, model, predictor, batch_size: int) -> dict[str, Any]:
    """Everything besides a click's own patch that a piece depends on (JSON types only)."""
    try:  # size and time, not the path: a moved project keeps its reruns
        st = os.stat(slide_path)
        file = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:  # a slide that is no file (a URL a reader opens): never the same twice
        file = {"unknown": os.urandom(8).hex()}
    fp = {
        "nuclick_wsi": __version__,
        "slide": {**file, "reader": slide.reader, "width": slide.width, "height": slide.height,
                  "bounds_offset": list(slide.bounds_offset)},
        "mpp": float(mpp),
        "model": model_identity(model),
        "compute": {"device": str(predictor.device), "precision": predictor.precision.name,
                    "runtime": predictor.runtime.name, "openvino": openvino_version() if predictor.runtime.name == "openvino" else None,
                    "tta": predictor.tta,
                    "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()},
        "batch_size": int(batch_size),
    }
    return json.loads(json.dumps(fp, sort_keys=True))


def fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words (None: the same)."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    name = WHAT.get(f"{key}.{sub}", f"{WHAT.get(key, key)} ({sub})")
                    return f"{name} changed"
        return f"{WHAT.get(key, key)} changed"
    return None


@dataclass
class Previous:
    """The earlier run in the output folder, as far as a rerun may use it."""

    state: RerunState | None
    why: str | None  #: why nothing of it is used (None: its id table is used)
    table: IdTable = field(default_factory=IdTable)
    slide: str | None = None  #: the slide file the earlier report names

    def another_slide(self, slide_path: str | os.PathLike) -> str | None:
        """The earlier run's slide when it is another file that still exists (two slides of one name
        written into one folder: this run replaces the other's outputs); None otherwise (the same
        file, a moved one, or no earlier run)."""
        if not self.slide:
            return None
        try:
            return None if os.path.samefile(self.slide, slide_path) else self.slide
        except OSError:  # the earlier slide is gone (moved, renamed) or this one is no file
            return None


def read_previous(report: Path, labels: Path, *, full: bool) -> Previous:
    """The earlier run's state, when its outputs are complete and the state is the one its report names."""
    if full:
        return Previous(None, "--full")
    if not report.exists():
        return Previous(None, "no earlier run in the output folder")
    slide = None
    try:
        earlier = json.loads(report.read_text(encoding="utf-8"))
        slide = (earlier.get("slide") or {}).get("path")
        slide = slide if isinstance(slide, str) else None
        sha = (earlier.get("rerun") or {}).get("state_sha256")
        if not isinstance(sha, str):
            raise ValueError(f"{report} names no rerun state (no nucleus run, or an older nuclick-wsi)")
        if not is_complete(labels):
            raise ValueError(f"{labels} is incomplete")
        state = read_state(labels, sha)
        return Previous(state, None, IdTable.from_json(state.ids), slide)
    except (OSError, ValueError, AttributeError) as exc:
        why = (str(exc) if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError)
               else f"{report}: unreadable ({exc})")
        return Previous(None, f"earlier outputs not reusable: {why}", slide=slide)


@dataclass
class Rerun:
    """What this run takes from the earlier one."""

    fingerprint: dict[str, Any]
    cache: dict[str, PackedPiece]
    why: str | None  #: why nothing is reused (None: incremental)
    outlines: dict[str, bytes] = field(default_factory=dict)  #: traced outlines (WKB) by outline key
    chunks: ChunkTable | None = None  #: the earlier label store's chunk table (None: copy no chunk)
    finals: dict[str, tuple] = field(default_factory=dict)  #: the earlier final instances (:mod:`.reuse`)
    contents: dict[str, str] = field(default_factory=dict)  #: the earlier content keys -> signatures


def decide(previous: Previous, fp: dict[str, Any], *, recompute: bool = False) -> Rerun:
    """Reuse the earlier pieces when the fingerprints agree (and not ``recompute``); log one line
    saying which it is."""
    why = previous.why
    if previous.state is not None:
        why = "recompute asked for" if recompute else fingerprint_change(previous.state.fingerprint, fp)
    if why is None:
        log.info("incremental rerun: reusing the earlier run's pieces where clicks and neighbours are unchanged")
        return Rerun(fp, dict(previous.state.pieces), None, previous.state.outlines, previous.state.chunks,
                     previous.state.finals, previous.state.contents)
    log.info("full run: %s", why)
    return Rerun(fp, {}, why)


def report_section(rerun: Rerun, table: IdTable, run, state_sha256: str, store) -> dict[str, Any]:
    """The report's ``rerun`` section: mode, why full, pieces reused and recomputed, instances taken
    without stitching (``run``: the nuclei's PromptRun), id changes, and the label store's (``store``)
    chunk files copied from the earlier store and written."""
    strategy = run.strategy
    return {"mode": "full" if rerun.why else "incremental", "why_full": rerun.why,
            "reused": strategy.reused, "recomputed": len(strategy.pieces) - strategy.reused, "taken": run.taken,
            "ids": dict(table.counts, next_id=table.next_id), "state_sha256": state_sha256,
            "chunks_copied": store.ledger.copied, "chunks_written": store.ledger.written}
