"""``S.qc.html``: the sections of one slide's page, put together."""

from __future__ import annotations

import time
from collections import Counter

from nuclick_wsi.qc.data import QcInputs
from nuclick_wsi.qc.gallery import crops, pick
from nuclick_wsi.qc.html import esc, gallery, img_tag, json_block, kv_table, page
from nuclick_wsi.qc.overview import class_colours, open_report_slide, overview_figures
from nuclick_wsi.qc.plots import distributions, median_area_um2


def _run_rows(rep: dict) -> list[tuple[str, object, str]]:
    mpp, model, t = rep.get("mpp") or {}, rep.get("model") or {}, rep.get("timings_s") or {}
    prec = rep.get("precision") or {}
    rows = [("slide", rep["slide"].get("path"), ""),
            ("size", f"{rep['slide'].get('width')} x {rep['slide'].get('height')} px, reader {rep['slide'].get('reader')}", ""),
            ("um/px used", f"{mpp.get('slide')} ({mpp.get('source')}); model {mpp.get('model')} um/px, "
                           f"{mpp.get('level0_px_per_model_px')} level-0 px per model px", ""),
            ("clicks file", (rep.get("points") or {}).get("path"), ""),
            ("model", f"{model.get('source')} ({model.get('arch')}, patch {model.get('patch_size')} px)", ""),
            ("post-processing", model.get("postprocess"), ""),
            ("device", rep.get("device"), ""),
            ("precision", f"{prec.get('name')}: {prec.get('reason')}", ""),
            ("timings (s)", ", ".join(f"{k} {v}" for k, v in t.items()), ""),
            ("nuclick-wsi", rep.get("nuclick_wsi_version"), "")]
    card = model.get("held_out")
    if card:
        for key, f in card["figures"].items():
            rows.append((f"model card, held out ({key})", ", ".join(
                f"{m.upper()} {f[m]}" for m in ("aji", "dice", "pq") if m in f) + f", {f.get('objects')} nuclei", ""))
    else:
        rows.append(("model card", "held-out figures not recorded in the report", ""))
    for note in rep["slide"].get("notes") or []:
        rows.append(("slide note", note, ""))
    return rows


def build_page(inputs: QcInputs, reasons: dict[int, list[str]], n_review: int, t0: float) -> str:
    """The whole HTML page of one slide."""
    rep = inputs.report
    totals = rep.get("totals") or {}
    slide = open_report_slide(inputs)
    try:
        colours = class_colours(inputs)
        figs = overview_figures(inputs, slide)
        sample, low = pick(inputs)
        sample_crops = crops(inputs, slide, sample, colours, reasons)
        low_crops = crops(inputs, slide, low, colours, reasons)
    finally:
        slide.close()
    plots = distributions(inputs, colours)
    measure = ("NuClick confidence (soft IoU of the outline with the probability map around it; 1 = crisp)"
               if inputs.measure == "confidence" else "NuClick score (mean probability over the outline's pixels; this run has no confidence measure)")
    med = median_area_um2(inputs)
    why = Counter(r.split(" (")[0] for rs in reasons.values() for r in rs)
    counts = [("clicks", totals.get("clicks"), "clicks"), ("outlines (segmented)", len(inputs.outlines), "segmented"),
              ("skipped clicks", len(inputs.skipped), "skipped"),
              ("median area (um²)", None if med is None else f"{med:.1f}", ""),
              ("outlines flagged for review", len(reasons), "flagged"),
              ("review list entries (S.review.geojson)", n_review, "review")]
    counts += [(f"  skipped: {k}", v, "") for k, v in (totals.get("skipped_by_reason") or {}).items()]
    counts += [(f"  flagged: {k}", v, "") for k, v in sorted(why.items())]
    body = [f"<h1>NuClick QC: {esc(inputs.stem)}</h1>", kv_table(counts),
            f'<p class="note">Confidence shown: {esc(measure)}.</p>',
            "<h2>Overview</h2>", '<p class="note">Outlines coloured by class; x: skipped clicks by reason. '
            "Then: where the work was (outlines per hexagon).</p>",
            '<div class="row">', img_tag(figs["overview"], "image/png", "overview", "ov", "overview"),
            img_tag(figs["density"], "image/png", "density", "", "density"), "</div>",
            f"<h2>Least confident outlines ({len(low_crops)})</h2>", gallery(low_crops, inputs.measure, "low"),
            f"<h2>Random sample ({len(sample_crops)})</h2>", gallery(sample_crops, inputs.measure, "sample"),
            "<h2>Distributions</h2>", img_tag(plots, "image/png", "plots", "wide", "plots"),
            "<h2>Review list</h2>",
            f"<p>{n_review} entries in <code>{esc(inputs.stem)}.review.geojson</code>: import it into QuPath "
            "(workflows/qupath/import_results.groovy with <code>IMPORT_REVIEW = true</code>, or drag the file onto "
            "the image) and walk the class \"NuClick review\" in the Annotations tab.</p>",
            "<h2>The run</h2>", kv_table(_run_rows(rep))]
    data = {"clicks": totals.get("clicks"), "segmented": len(inputs.outlines), "skipped": len(inputs.skipped),
            "flagged": len(reasons), "review": n_review, "measure": inputs.measure,
            "gallery": {"low": len(low_crops), "sample": len(sample_crops)}}
    body.append(f'<p class="note">Report built in {time.perf_counter() - t0:.1f} s from the outputs in '
                f"{esc(inputs.out_dir)}.</p>")
    body.append(json_block(data))
    return page(f"NuClick QC: {inputs.stem}", "\n".join(body))
