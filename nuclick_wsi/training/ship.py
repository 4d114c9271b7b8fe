"""Ship a trained checkpoint as the embedded default model, with its model card.

    python -m nuclick_wsi.training.ship runs/default/model.pt ../shared/data/monuseg-train \\
        --test TCGA-21-5786-01Z-00-DX1,TCGA-AR-A1AS-01Z-00-DX1,... --train-command "nuclick-wsi train ..."

Steps: pick the post-processing threshold on the validation tiles (never the test tiles), evaluate
on the held-out test tiles with clicks at the centroids and with 5 px jitter, then write the weights
(without optimizer state) with that metadata to ``nuclick_wsi/model/default-nuclei.pt`` and
regenerate ``nuclick_wsi/model/MODEL_CARD.md``. Refuses to replace shipped weights that score a
higher AJI on the same test tiles unless ``--force``.

The final model may be trained on every tile (``train --val none --init RECIPE``): then ``--recipe
RECIPE`` names the checkpoint of the same recipe trained without the test tiles; the threshold is
picked with it on its validation tiles and every held-out figure is its figure (the card says so),
since the final model has seen the test tiles. ``--organ CKPT --organ-tiles ... --in-dist-tiles ...``
adds the cross-organ estimate: a run that never saw one organ, scored on that organ's tiles and on
held-out tiles of the organs it saw.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import platform
from pathlib import Path

import torch

from nuclick_wsi import __version__
from nuclick_wsi.evaluation.protocol import evaluate, load_eval_tiles
from nuclick_wsi.model.weights import default_weights_path, load_model, save_checkpoint
from nuclick_wsi.pipeline import SegmentOptions


ARCH_TEXT = {
    "s2d-unet": ("a U-Net whose encoder-decoder runs at half resolution behind a 2x2 space-to-depth stem, with a "
                 "full-resolution head on the input's own features (residual blocks, multi-scale dilated bottleneck)"),
    "light-unet": "a U-Net with residual blocks and a multi-scale dilated bottleneck",
}
LOSS_TEXT = {
    "calibrated": ("soft Dice + BCE weighted 1 on the clicked nucleus and the background, 3 on the other nuclei "
                   "(no size-dependent weight: the paper's a^2 term made small nuclei come out too big)"),
    "nuclick": "soft Dice + the paper's weighted BCE (W = a^2 G + a G~ + 1)",
}


def _rows(label: str, res: dict, methods=None) -> list[str]:
    out = []
    for method, d in res["overall"].items():
        if methods and method not in methods:
            continue
        out.append(f"| {label} | {method} | {d['aji']:.3f} | {d['dice']:.3f} | {d['dq']:.3f} | {d['sq']:.3f} | "
                   f"{d['pq']:.3f} | {d['hausdorff']:.2f} |")
    return out


def _final_text(meta: dict) -> str:
    """What the card says when the shipped weights were trained on every tile after the recipe run."""
    rec = meta.get("recipe")
    if not rec:
        return ""
    return (f"- **The shipped weights saw every tile**: they continue the recipe run ({rec['samples_seen']:,} samples, "
            f"{rec['minutes']:.0f} min, the test tiles held out) on all {rec['final_tiles']} tiles for "
            f"{rec['final_minutes']:.0f} more minutes. The held-out figures below are the recipe run's, measured before "
            f"the test tiles joined training: an estimate for the shipped weights, which cannot be scored on tiles "
            f"they learned from.\n")


def _lr_text(meta: dict) -> str:
    lr = meta["training"]["config"]["lr"]
    rec = meta.get("recipe")
    return f"{rec['lr']} (then {lr} on all tiles)" if rec and "lr" in rec else f"{lr}"


def _organ_text(meta: dict) -> str:
    org = meta.get("cross_organ")
    if not org:
        return ""
    a, b = org["held_out_organ"]["overall"]["model"], org["in_distribution"]["overall"]["model"]
    per_tile = ", ".join(f"{t['name']} {t['model']['aji']:.3f}" for k in ("held_out_organ", "in_distribution")
                         for t in org[k]["tiles"])
    return f"""
## Cross-organ estimate
A run of the same recipe that never saw {org['organ']} ({len(org['excluded']) - len(org['in_dist_tiles'])} {org['organ']} tiles and the
{len(org['in_dist_tiles'])} test tiles below excluded; {org['minutes']:.0f} min of training to its best validation epoch), scored on the
{org['organ']} tiles with outlines and on held-out tiles of organs it did see:

| tiles | AJI | Dice | SQ | PQ |
|---|---|---|---|---|
| {org['organ']} (organ never seen): {', '.join(org['organ_tiles'])} | {a['aji']:.3f} | {a['dice']:.3f} | {a['sq']:.3f} | {a['pq']:.3f} |
| seen organs, held-out tiles: {', '.join(org['in_dist_tiles'])} | {b['aji']:.3f} | {b['dice']:.3f} | {b['sq']:.3f} | {b['pq']:.3f} |

Gap: {b['aji'] - a['aji']:+.3f} AJI (in-distribution minus unseen organ; negative: the unseen organ scored higher).
Per tile AJI: {per_tile}.
"""


def _card(meta: dict, size_mb: float) -> str:
    tr = meta["training"]
    test = meta["held_out"]
    conds = [("clicks at centroids", test["jitter0"], None), ("clicks jittered, sigma 5 px", test["jitter5"], ("model",)),
             ("tiles read at 20x (0.5 um/px)", test["scale05"], ("model",))]
    if "tta" in test:
        conds.append(("clicks at centroids, `--tta`", test["tta"], ("model",)))
    rows = [r for label, res, methods in conds for r in _rows(label, res, methods)]
    cal_names = list(test["jitter0"]["size_calibration"])
    cal = [f"| {label} | " + " | ".join(str(res["size_calibration"][n]["median_area_ratio"]) for n in cal_names) + " |"
           for label, res, _ in conds]
    rank = test["jitter0"].get("confidence_ranking") or {}
    per_tile = "\n".join(
        f"| {t['name']} | {t['objects']} | {t['model']['aji']:.3f} | {t['model']['dice']:.3f} | {t['model']['pq']:.3f} |"
        for t in test["jitter0"]["tiles"])
    pp = meta["postprocess"]
    cfg = tr["config"]
    prec = meta.get("training_precision", {})
    speed = "\n".join(f"- {line}" for line in meta.get("speed", [])) or "- (no benchmark given to ship)"
    return f"""# Model card: nuclick-wsi default nucleus model

`default-nuclei.pt` ({size_mb:.1f} MB), used by `nuclick-wsi segment` when no `--weights` is given.

## What it is
- Task: NuClick interactive nucleus segmentation. Input: a {meta['patch_size']}x{meta['patch_size']} patch at
  **{meta['mpp']} um/px** (40x) centred on a click: RGB in [0, 1], inclusion map (the click), exclusion map
  (the other clicks in the patch). Output: one sigmoid channel.
- Architecture: `{meta['arch']}` {meta['arch_args']}: {ARCH_TEXT.get(meta['arch'], meta['arch'])};
  {meta['n_params']:,} parameters.
- Post-processing: threshold {pp['threshold']} (picked on the validation tiles, never the test tiles), objects
  < {pp['min_object_px']} px dropped, holes < {pp['min_hole_px']} px filled, the 4-connected component containing the click kept.
- Confidence per outline (`NuClick confidence`): soft IoU of the outline with the probability map in a 6 px ring
  around it (nuclick_wsi/postprocess/confidence.py).

## Data and licence
- MoNuSeg 2018 training set (Kumar et al.), H&E, 40x, TCGA, several organs. **Licence CC BY-NC-SA 4.0**:
  these weights inherit the non-commercial, share-alike terms of the data.
- Trained on {len(tr['train_tiles'])} tiles: those with instance outlines (ImageScope XML) and the tiles that only have
  binary masks, from which only compact connected components (solidity >= 0.9, area >= 30 px) are clicked targets;
  the other components still count as neighbours.
- Validation (checkpoint and threshold selection): {', '.join((meta.get('recipe') or tr)['val_tiles'])}.
- Held-out test tiles, never seen in training or selection: {', '.join(test['tiles'])}. Their organs also occur
  among the training tiles (see the cross-organ section for an organ held out whole).
{_final_text(meta)}
## Held-out results (`nuclick-wsi evaluate`, one click per ground-truth nucleus, mean over tiles)
| clicks | method | AJI | Dice | DQ | SQ | PQ | Hausdorff px |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Median predicted / true area by true nucleus size (1.0 = no size bias; 6.25 um^2 = 100 px at 0.25 um/px):

| condition | {' | '.join(cal_names)} |
|---|{'---|' * len(cal_names)}
{chr(10).join(cal)}

Outline confidence vs IoU with the truth (clicks at centroids): Spearman rho {rank.get('spearman_rho')}; mean IoU of the
5% least confident outlines {rank.get('iou_worst_5pct')} vs {rank.get('iou_rest')} for the rest.

Per test tile (clicks at centroids):

| tile | nuclei | AJI | Dice | PQ |
|---|---|---|---|---|
{per_tile}

Published NuClick on MoNuSeg (16 training tiles, full network): AJI 0.834, Dice 0.912, PQ 0.838.
{_organ_text(meta)}
## Speed
{speed}

## Training
- Recipe: a new random click inside the nucleus, >= 2 px from its edge, each time a patch is drawn; exclusion map
  from the other nuclei's centroids (10% dropped at random, as users do not click every nucleus); loss
  {LOSS_TEXT.get(cfg.get('loss') or 'nuclick')}; Adam lr {_lr_text(meta)}, weight decay {cfg['weight_decay']}, batch
  {cfg['batch_size']}, cosine schedule annealed to the time budget; precision {prec.get('name', 'bf16')}
  ({prec.get('reason', 'autocast')}), channels_last.
- Augmentation: rotation, flips, scale 0.8-1.25, 20x/30x resolution simulation, H&E stain jitter, brightness,
  contrast, saturation, blur/sharpen, channel shuffle (5%), Gaussian noise.
- Samples seen: {tr['samples_seen']:,}, {tr['elapsed_s'] / 60 + (meta.get('recipe') or {}).get('minutes', 0):.0f} min in all on {meta['hardware']}.
- Reproduce: `{meta['train_command']}`
- Shipped with: `{meta['ship_command']}`
- nuclick-wsi {meta['package_version']}, torch {torch.__version__}, {platform.python_version()}.

## Limits
- H&E only; trained on 40x TCGA tiles. Slides at other resolutions are resampled to {meta['mpp']} um/px
  (20x slides are upsampled: see the 20x row above).
- Below the NuClick paper's outline quality on these test tiles. Twice the samples and four times the width,
  trained on a GPU, gained at most 0.007 AJI and left the size bias as it is (benchmarks/models/README.md):
  the limit is the 13 outlined training tiles and their annotation style, not compute.
- Non-commercial use only (data licence).
"""


def _samples_seen(tr: dict) -> int:
    per_epoch = tr["config"].get("samples_per_epoch") or tr["train_objects"]
    return int(tr.get("epochs_done", len(tr.get("history", []))) * per_epoch)


def _pick_threshold(model, data: str, thresholds: str) -> float:
    """The cut with the best AJI on the model's validation tiles (never the test tiles)."""
    import sys

    meta = model.metadata
    val_tiles = load_eval_tiles([data], meta["training"]["val_tiles"])
    best_t, best_aji = None, -1.0
    for t in (float(v) for v in thresholds.split(",")):
        model.metadata = dict(meta, postprocess=dict(meta["postprocess"], threshold=t))
        aji = evaluate(val_tiles, model, baselines=False, options=SegmentOptions(progress=False, duplicate_px=0)
                       )["overall"]["model"]["aji"]
        print(f"validation threshold {t}: AJI {aji:.4f}", file=sys.stderr)
        if aji > best_aji:
            best_t, best_aji = t, aji
    model.metadata = meta
    return best_t


def _cross_organ(args, opts: SegmentOptions, threshold: float) -> dict:
    """The held-out-organ run scored on the organ's outlined tiles and on held-out tiles of seen organs."""
    organ = load_model(args.organ)
    organ.metadata = dict(organ.metadata, postprocess=dict(organ.metadata["postprocess"], threshold=threshold))
    split = lambda v: [n for n in v.split(",") if n]  # noqa: E731
    res = {k: evaluate(load_eval_tiles([args.data], split(v)), organ, options=opts, baselines=False)
           for k, v in (("held_out_organ", args.organ_tiles), ("in_distribution", args.in_dist_tiles))}
    tr = organ.metadata["training"]
    return {"organ": args.organ_name, "checkpoint": args.organ, "excluded": tr["config"]["exclude"],
            "minutes": tr["elapsed_s"] / 60, "organ_tiles": split(args.organ_tiles),
            "in_dist_tiles": split(args.in_dist_tiles), "threshold": threshold, **res}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--test", required=True, help="comma-separated held-out tile names")
    ap.add_argument("--train-command", required=True)
    ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--output", default=str(default_weights_path()))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--speed", action="append", default=[], help="A line for the card's speed section (repeatable).")
    ap.add_argument("--recipe", help="checkpoint of the same recipe without the test tiles (CHECKPOINT saw them)")
    ap.add_argument("--organ", help="checkpoint of a run that never saw one organ")
    ap.add_argument("--organ-name", default="the held-out organ")
    ap.add_argument("--organ-tiles", default="", help="that organ's outlined tiles")
    ap.add_argument("--in-dist-tiles", default="", help="held-out tiles of organs the --organ run saw")
    args = ap.parse_args(argv)
    import sys

    model = load_model(args.checkpoint)
    judge = load_model(args.recipe) if args.recipe else model  # the held-out figures are this checkpoint's
    meta = dict(model.metadata)
    tr = meta["training"]
    opts = SegmentOptions(progress=False, duplicate_px=0)
    best_t = _pick_threshold(judge, args.data, args.thresholds)
    meta["postprocess"] = dict(meta["postprocess"], threshold=best_t)
    model.metadata = meta
    judge.metadata = dict(judge.metadata, postprocess=dict(judge.metadata["postprocess"], threshold=best_t))
    names = [n for n in args.test.split(",") if n]
    test_tiles = load_eval_tiles([args.data], names)
    res0 = evaluate(test_tiles, judge, options=opts)
    res5 = evaluate(test_tiles, judge, jitter=5.0, options=opts)
    res20x = evaluate(test_tiles, judge, options=opts, baselines=False, scale=0.5)
    res_tta = evaluate(test_tiles, judge, options=replace(opts, tta=True), baselines=False)
    if args.recipe:
        rt = judge.metadata["training"]
        meta["recipe"] = {"checkpoint": args.recipe, "samples_seen": _samples_seen(rt), "minutes": rt["elapsed_s"] / 60,
                          "final_tiles": len(tr["train_tiles"]), "final_minutes": tr["elapsed_s"] / 60,
                          "train_tiles": rt["train_tiles"], "val_tiles": rt["val_tiles"], "lr": rt["config"]["lr"]}
    if args.organ:
        meta["cross_organ"] = _cross_organ(args, opts, best_t)
    out = Path(args.output)
    if out.exists() and not args.force:
        old = load_model(out)
        old_aji = old.metadata.get("held_out", {}).get("jitter0", {}).get("overall", {}).get("model", {}).get("aji", -1)
        if old.metadata.get("held_out", {}).get("tiles") == names and old_aji >= res0["overall"]["model"]["aji"]:
            raise SystemExit(f"shipped model scores AJI {old_aji:.4f} >= {res0['overall']['model']['aji']:.4f}: not replaced")
    tr = dict(tr, samples_seen=_samples_seen(tr) + (meta["recipe"]["samples_seen"] if args.recipe else 0))
    meta.update(training=tr, held_out={"tiles": names, "jitter0": res0, "jitter5": res5, "scale05": res20x,
                                       "tta": res_tta, "measured_on": args.recipe or args.checkpoint},
                speed=list(args.speed),
                train_command=args.train_command, ship_command="python -m nuclick_wsi.training.ship " + " ".join(argv or sys.argv[1:]),
                licence="CC BY-NC-SA 4.0 (inherited from MoNuSeg)", package_version=__version__)
    meta.pop("command", None)
    save_checkpoint(out, model.net, model.arch, model.arch_args, meta)
    size = out.stat().st_size / 1e6
    meta.update(arch=model.arch, arch_args=model.arch_args, n_params=sum(p.numel() for p in model.net.parameters()))
    (out.parent / "MODEL_CARD.md").write_text(_card(meta, size))
    print(json.dumps({"threshold": best_t, "test": res0["overall"], "jitter5": res5["overall"]["model"],
                      "20x": res20x["overall"]["model"], "tta": res_tta["overall"]["model"], "size_calibration": res0["size_calibration"],
                      "confidence_ranking": res0["confidence_ranking"]}, indent=1))


if __name__ == "__main__":
    main()
