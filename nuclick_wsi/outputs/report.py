"""The report of a ``segment`` run (``S.report.json``): inputs, models, totals, timings, one record per prompt."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nuclick_wsi import __version__
from nuclick_wsi.outputs.safety import COMMIT_MARKER_SUFFIX


def skipped_by_reason(records: list[dict[str, Any]]) -> dict[str, int]:
    """Skipped prompts counted by the text of their reason before " (" and ":"."""
    reasons: dict[str, int] = {}
    for rec in records:
        if rec["status"] == "skipped":
            key = rec["reason"].split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return reasons


def card_figures(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The model card's held-out figures (overall, per click jitter) from a checkpoint's metadata."""
    held = (metadata or {}).get("held_out") or {}
    out = {}
    for key, val in held.items():
        if isinstance(val, dict) and isinstance((val.get("overall") or {}).get("model"), dict):
            out[key] = {"jitter_px": val.get("jitter"), "objects": val.get("objects"), **val["overall"]["model"]}
    return {"tiles": held.get("tiles"), "figures": out} if out else None


def model_section(model, run) -> dict[str, Any]:
    """The nucleus model's report section: where it came from, its thresholds (model pixels) and, when
    its card has them, its held-out figures (shown by the QC page)."""
    scale = run.strategy.scale  # the thresholds as run (level-0 px) back in model px, as reports always gave them
    post = run.params.scaled(1 / scale ** 2) if scale != 1 else run.params
    section = {"source": model.source, "arch": model.arch, "patch_size": model.patch_size, "postprocess": asdict(post)}
    figures = card_figures(model.metadata)
    if figures:
        section["held_out"] = figures
    return section


def gland_model_section(model, run) -> dict[str, Any]:
    return {"source": model.source, "arch": model.arch, "task": model.task, "patch_size": model.patch_size,
            "mpp": model.mpp, "level0_px_per_model_px": run.strategy.scale, "context": run.strategy.context,
            "postprocess": asdict(run.model_params)}


def segment_report(*, slide, prompts, slide_path, points_path, mpp: float, nuclei, gland, predictor,
                   paths: dict, timer, wall: float, points_sha: str | None = None,
                   asked: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of one slide. ``nuclei``/``gland``: (model, run) of each kind of prompt, or None;
    ``points_sha``: SHA-256 of the clicks file as read (batch and qupath run redo a slide whose file differs);
    ``asked``: what the run was asked for (:func:`~nuclick_wsi.outputs.asked.asked_section`; batch and
    qupath run redo a slide asked for something else)."""
    clicks = nuclei[1].records() if nuclei else []
    n_seg = len(nuclei[1].instances) if nuclei else 0
    model = nuclei[0] if nuclei else None
    rep: dict[str, Any] = {
        "nuclick_wsi_version": __version__,
        "slide": {"path": str(slide_path), "reader": slide.reader, "width": slide.width, "height": slide.height,
                  "bounds_offset": list(slide.bounds_offset), "notes": list(getattr(slide, "notes", []))},
        "points": {"path": str(points_path), "format": prompts.format, "sha256": points_sha,
                   "not_prompts": prompts.skipped},
        "mpp": {"slide": mpp, "source": slide.mpp_source, "model": model.mpp if model else None,
                "level0_px_per_model_px": nuclei[1].strategy.scale if nuclei else None},
        "model": model_section(*nuclei) if nuclei else None,
        "asked": asked,
        "device": predictor.description,
        "precision": {"name": predictor.precision.name, "reason": predictor.precision.reason},
        "runtime": {"name": predictor.runtime.name, "reason": predictor.runtime.reason},
        "totals": {"clicks": len(clicks), "segmented": n_seg, "skipped": len(clicks) - n_seg,
                   "skipped_by_reason": skipped_by_reason(clicks)},
        "timings_s": {**{k: round(v, 3) for k, v in timer.seconds.items()}, "wall": round(wall, 3),
                      "nuclei_per_s": round(n_seg / wall, 2) if wall else None},
        "outputs": {k: str(p) for k, p in paths.items()},
        "clicks": clicks,
    }
    if predictor.tta:  # only when asked for, so reports of plain runs keep their bytes
        rep["tta"] = {"flips": len(predictor.TTA_FLIPS), "note": "probability = mean over the patch and its flips"}
    if gland:
        records = gland[1].records()
        n_gl = sum(r["status"] == "segmented" for r in records)
        rep["gland_model"] = gland_model_section(*gland)
        rep["totals"].update(squiggles=len(records), glands_segmented=n_gl, glands_skipped=len(records) - n_gl,
                             glands_skipped_by_reason=skipped_by_reason(records))
        rep["timings_s"]["glands_per_s"] = round(n_gl / wall, 2) if wall else None
        rep["squiggles"] = records
    return rep


#: report fields that differ between two runs giving the same outputs
RUN_ONLY_FIELDS = ("timings_s", "device", "rerun", "outputs")


def comparable_digests(out_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``out_dir`` (by path relative to it), each ``*.report.json`` without
    :data:`RUN_ONLY_FIELDS`: equal for two runs that wrote the same outputs (say, an incremental rerun
    and a from-scratch run with the same id table). The hidden commit markers are left out: they name
    what this tool wrote in the folder, which depends on its history, not on the outputs. KeyError for
    a report lacking one of those fields."""
    out = Path(out_dir)
    got = {}
    for p in sorted(q for q in out.rglob("*") if q.is_file() and not q.name.endswith(COMMIT_MARKER_SUFFIX)):
        data = p.read_bytes()
        if p.name.endswith(".report.json"):
            rep = json.loads(data)
            for key in RUN_ONLY_FIELDS:
                rep.pop(key)
            data = json.dumps(rep, sort_keys=True).encode()
        got[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return got
