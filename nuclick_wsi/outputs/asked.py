"""What a ``segment`` run was asked for, as far as it decides the outputs: the report's ``asked``
section, and the words for what differs between an earlier run's and this one's (``batch`` and
``qupath run`` redo a slide whose complete outputs were asked for something else).

Not in it, since they do not change what the outputs mean: device, precision, runtime, threads,
batch size, progress. Formats and gzip are read from the report's ``outputs``; the NGFF version from
the label stores themselves (:func:`~nuclick_wsi.outputs.paths.outputs_fresh`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nuclick_wsi.model.weights import weights_sha256

#: readable names of the asked fields (a model's: prefixed with "gland " for the gland model)
WHAT = {"object_type": "object type", "mpp": "slide um/px (--mpp or the manifest's)", "bounds_offset": "bounds offset",
        "reader": "slide reader", "roi": "--roi", "tta": "test-time augmentation", "duplicate_px": "duplicate distance",
        "chunk": "label store chunk size", "squiggle_groups": "squiggle groups", "weights_sha256": "model weights",
        "arch": "model architecture", "arch_args": "model architecture", "patch_size": "model patch size",
        "mpp_model": "model um/px", "threshold": "threshold", "min_object_px": "min_object_px",
        "min_hole_px": "min_hole_px"}

#: the keys of the report's ``outputs`` that are not polygon formats
NOT_FORMATS = ("labels", "report", "glands")


def model_identity(model) -> dict[str, Any]:
    """A loaded model as far as it decides what it segments: its weights (a hash of the state dict),
    architecture, patch size, um/px and post-processing thresholds (model pixels)."""
    return {"weights_sha256": weights_sha256(model.net), "arch": model.arch, "arch_args": model.arch_args,
            "patch_size": model.patch_size, "mpp": model.mpp, "postprocess": model.postprocess}


def asked_section(opts, nuclei, gland) -> dict[str, Any]:
    """The report's ``asked`` section: ``opts`` (SegmentOptions) and the models (None: no such prompts)."""
    asked = {"object_type": opts.object_type, "mpp": opts.mpp, "bounds_offset": bool(opts.bounds_offset),
             "reader": opts.reader, "roi": bool(opts.roi), "tta": bool(opts.tta), "duplicate_px": opts.duplicate_px,
             "chunk": opts.chunk, "squiggle_groups": list(opts.squiggle_groups),
             "nuclei": None if nuclei is None else model_identity(nuclei),
             "gland": None if gland is None else model_identity(gland)}
    return json.loads(json.dumps(asked))


def _model_changes(old: Any, new: Any, prefix: str) -> list[str]:
    if old == new:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [f"{prefix}model"]
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "postprocess" and isinstance(a, dict) and isinstance(b, dict):
            out += [prefix + WHAT.get(k, k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(prefix + WHAT.get("mpp_model" if key == "mpp" else key, key))
    return out


def asked_change(report: dict[str, Any], asked: dict[str, Any], formats: Sequence[str], gzip: bool) -> str | None:
    """What this run asks (``asked``, ``formats``, ``gzip``) that the run which wrote ``report`` was not
    asked, in words ("threshold changed"); None: the same, or a report without an ``asked`` section
    (an older nuclick-wsi: its complete outputs count as done, as they did then)."""
    old = report.get("asked")
    if not isinstance(old, dict):
        return None
    changed = []
    for key in sorted(set(old) | set(asked)):
        if key in ("nuclei", "gland"):
            changed += _model_changes(old.get(key), asked.get(key), "" if key == "nuclei" else "gland ")
        elif old.get(key) != asked.get(key):
            changed.append(WHAT.get(key, key))
    written = report.get("outputs") or {}
    if sorted(k for k in written if k not in NOT_FORMATS) != sorted(set(formats)):
        changed.append("formats")
    elif "qupath" in written and str(written["qupath"]).endswith(".gz") != bool(gzip):
        changed.append("gzip")
    return f"{', '.join(dict.fromkeys(changed))} changed" if changed else None
