"""Train NuClick nucleus models with the device-side sampler, on a GPU when one is lent (or on CPU, slowly).

Needs torch, numpy, scipy, scikit-image and Pillow only (no slide or annotation readers): the tiles come
packed by ``--pack`` on a machine that has the data:

    python benchmarks/train_device.py --pack ../shared/data/monuseg-train .pack/monuseg.npz
    python benchmarks/train_device.py --tiles .pack/monuseg.npz --out runs/gpu --name s2d16 \\
        --widths 16,32,64,128 --loss calibrated --minutes 7 --device cuda \\
        --val TCGA-CH-5767-01Z-00-DX1,TCGA-E2-A1B5-01Z-00-DX1 \\
        --exclude TCGA-21-5786-01Z-00-DX1,TCGA-AR-A1AS-01Z-00-DX1,TCGA-B0-5710-01Z-00-DX1,TCGA-G9-6362-01Z-00-DX1

Writes ``OUT/NAME.pt``, a nuclick-wsi checkpoint: with ``--val``, the best one on the validation tiles
(mean IoU of the component holding a centroid click, best over a few thresholds, the threshold kept in
its metadata); with ``--val none``, the last. Adam with a warm-up and a cosine schedule annealed to the
time budget, bf16 autocast on CUDA, fp32 elsewhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nuclick_wsi import __version__  # noqa: E402
from nuclick_wsi.model.weights import POSTPROCESS_DEFAULTS, build_network, save_checkpoint  # noqa: E402
from nuclick_wsi.training.device_sampler import DevicePatchSampler, load_packed, pack_tiles  # noqa: E402
from nuclick_wsi.training.loss import nuclick_loss  # noqa: E402
from nuclick_wsi.training.sampling import PatchSampler  # noqa: E402
from nuclick_wsi.training.train import TrainConfig, load_tiles, lr_schedule, validate  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  #: validation cuts (train.validate keeps the best)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", nargs=2, metavar=("DATA", "NPZ"), help="pack DATA's tiles into NPZ and stop")
    ap.add_argument("--tiles", help="packed tiles (.npz)")
    ap.add_argument("--out", default="runs/device")
    ap.add_argument("--name", default="model")
    ap.add_argument("--arch", default="s2d-unet")
    ap.add_argument("--widths", default="16,32,64,128")
    ap.add_argument("--loss", default="calibrated")
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", default="none", help="validation tile names, comma-separated, or none")
    ap.add_argument("--exclude", default="", help="tile names never used (test tiles), comma-separated")
    ap.add_argument("--val-every", type=float, default=60.0, help="seconds between validations / saves")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    a = ap.parse_args(argv)
    if a.pack:
        tiles = load_tiles([a.pack[0]])
        pack_tiles(tiles, a.pack[1])
        print(f"packed {len(tiles)} tiles into {a.pack[1]} ({os.path.getsize(a.pack[1]) / 1e6:.1f} MB)")
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    log = lambda msg: print(f"[{a.name}] {msg}", flush=True)  # noqa: E731
    t_load = time.time()
    exclude = {s for s in a.exclude.split(",") if s}
    val_names = set() if a.val == "none" else {s for s in a.val.split(",") if s}
    tiles = [t for t in load_packed(a.tiles) if t.name not in exclude]
    train_tiles = [t for t in tiles if t.name not in val_names]
    val_tiles = [t for t in tiles if t.name in val_names]
    if val_names - {t.name for t in val_tiles}:
        raise SystemExit(f"validation tiles not found: {sorted(val_names - {t.name for t in val_tiles})}")
    sampler = DevicePatchSampler(train_tiles, seed=a.seed, device=dev)
    val_sampler = PatchSampler(val_tiles, seed=a.seed + 1) if val_tiles else None  # validation as train() does it
    log(f"{len(train_tiles)} training tiles ({len(sampler)} objects), {len(val_tiles)} validation tiles "
        f"({len(val_sampler) if val_sampler else 0} objects); loaded in {time.time() - t_load:.1f} s on {dev}")
    arch_args = {"widths": [int(w) for w in a.widths.split(",")]}
    net = build_network(a.arch, arch_args).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    budget = a.minutes * 60
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    post = dict(POSTPROCESS_DEFAULTS["nuclei"])
    meta = {"task": "nuclei", "mpp": 0.25, "patch_size": 128, "postprocess": post,
            "input": "RGB in [0, 1], inclusion map, exclusion map", "package_version": __version__,
            "hardware": f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.machine()}, "
                        f"torch {torch.__version__}",
            "command": " ".join(sys.argv),
            "training": {"sampler": "device", "loss": a.loss, "batch": a.batch, "lr": a.lr, "minutes": a.minutes,
                         "train_tiles": [t.name for t in train_tiles], "val_tiles": [t.name for t in val_tiles],
                         "excluded_tiles": sorted(exclude), "train_objects": len(sampler),
                         "sources": sorted({t.source.split(" (")[-1].rstrip(")") for t in tiles})}}
    # warm-up, then cosine to 2 % over the time budget (train's schedule; time, not steps, decides here)
    set_lr = lr_schedule(TrainConfig(data=[], output=str(out / f"{a.name}.pt"), lr=a.lr, max_minutes=a.minutes),
                         opt, sys.maxsize)
    history, best, step, seen = [], -1.0, 0, 0
    t0 = time.time()
    next_val = a.val_every
    run_loss, n_loss = 0.0, 0
    while True:
        elapsed = time.time() - t0
        done = elapsed >= budget or (a.max_steps and step >= a.max_steps)
        if elapsed >= next_val or done:
            next_val += a.val_every
            vm = validate(net, val_sampler, dev, 256, THRESHOLDS, dtype=dtype, loss_kind=a.loss) if val_sampler else {}
            rec = {"step": step, "samples": seen, "elapsed_s": round(elapsed, 1),
                   "train_loss": round(run_loss / max(n_loss, 1), 4), **vm}
            history.append(rec)
            run_loss, n_loss = 0.0, 0
            log(" ".join(f"{k}={v}" for k, v in rec.items()) + f"  ({seen / max(elapsed, 1e-9):.0f} samples/s)")
            m = dict(meta, training=dict(meta["training"], samples=seen, steps=step, elapsed_s=round(elapsed, 1),
                                         history=history))
            if vm:
                m["postprocess"] = dict(post, threshold=vm["threshold"])
                m["validation"] = vm
            if not vm or vm["iou"] > best:
                best = vm.get("iou", best)
                save_checkpoint(out / f"{a.name}.pt", net, a.arch, arch_args, m)
            if done:
                break
        x, g, go = sampler.batch(a.batch)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = nuclick_loss(logits, g, go, a.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(step, time.time() - t0)
        opt.step()
        step += 1
        seen += len(x)
        if step % 50 == 0:
            run_loss += loss.item()
            n_loss += 1
    log(f"done: {step} steps, {seen} samples in {time.time() - t0:.0f} s; best val IoU {best:.4f}")


if __name__ == "__main__":
    main()
