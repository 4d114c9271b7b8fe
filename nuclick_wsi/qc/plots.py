"""Plots (matplotlib): area and confidence per class, counts per class, skipped clicks by reason."""

from __future__ import annotations

import numpy as np

from nuclick_wsi.qc.data import QcInputs, finite
from nuclick_wsi.qc.overview import png_bytes


def distributions(inputs: QcInputs, colours) -> bytes:
    """One PNG with four panels."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 7), dpi=90, layout="constrained")
    (a_area, a_conf), (a_count, a_skip) = fig.subplots(2, 2)
    classes = sorted({o.class_name for o in inputs.outlines})
    um2 = inputs.mpp is not None
    for name in classes:
        own = [o for o in inputs.outlines if o.class_name == name]
        areas = finite(o.area_um2 if um2 else o.area_px for o in own)
        vals = finite(o.value for o in own)
        if areas:
            a_area.hist(areas, bins=30, histtype="step", linewidth=1.5, color=colours[name], label=name)
        if vals:
            a_conf.hist(vals, bins=30, histtype="step", linewidth=1.5, color=colours[name], label=name)
    a_area.set_xlabel("area (um²)" if um2 else "area (px)")
    a_conf.set_xlabel(f"NuClick {inputs.measure}")
    for ax in (a_area, a_conf):
        ax.set_ylabel("outlines")
        if classes:
            ax.legend(fontsize=8)
    counts = [sum(o.class_name == c for o in inputs.outlines) for c in classes]
    a_count.barh(classes or ["(none)"], counts or [0], color=[colours[c] for c in classes] or None)
    a_count.set_xlabel("outlines per class")
    by_reason = (inputs.report.get("totals") or {}).get("skipped_by_reason") or {}
    a_skip.set_xlabel("skipped clicks by reason")
    if by_reason:
        a_skip.barh(list(by_reason), list(by_reason.values()), color="grey")
        a_skip.invert_yaxis()
    else:
        a_skip.text(0.5, 0.5, "no click skipped", ha="center", va="center", transform=a_skip.transAxes)
        a_skip.set_xticks([])
        a_skip.set_yticks([])
    a_count.invert_yaxis()
    for ax in (a_count, a_skip) if by_reason else (a_count,):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{inputs.stem}: {len(inputs.outlines)} outlines, {len(inputs.skipped)} clicks skipped")
    return png_bytes(fig)


def median_area_um2(inputs: QcInputs) -> float | None:
    vals = finite(o.area_um2 for o in inputs.outlines)
    return float(np.median(vals)) if vals else None
