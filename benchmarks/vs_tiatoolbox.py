"""Side by side: the same NuClick weights, slide and clicks, TIAToolbox's way and `nuclick-wsi segment`.

TIAToolbox's way is what its NuClick documentation shows, one click at a time: ``WSIReader.read_rect`` of
a patch centred on the click at the model's um/px, inclusion/exclusion maps built by hand,
``NuClick.infer_batch`` (sigmoid) and ``NuClick.postproc`` (threshold, small objects and holes,
reconstruction from the click). Ours is the ``nuclick-wsi segment`` command, run as a child process.
Prints clicks/s of each and their ratio, and the IoU between the two outlines of every click.

Needs the extra (``pip install "nuclick-wsi[tiatoolbox]"``)::

    python benchmarks/vs_tiatoolbox.py                              # tiatoolbox:nuclick_original-pannuke
    python benchmarks/vs_tiatoolbox.py --weights nuclick_original-pannuke.pth --clicks 300
    python benchmarks/vs_tiatoolbox.py --weights random             # offline: seeded random NuClick weights
    python benchmarks/vs_tiatoolbox.py --weights runs/default/model.pt   # a nuclick-wsi checkpoint

``--weights random`` (TIAToolbox's ``NuClick`` with its own initialisation, seeded) measures speed only:
an untrained network's output changes with every sub-pixel difference between the two patches
(TIAToolbox reads from an integer level-0 corner with OpenCV's resampling, we read on our model-pixel
grid with Pillow's), so its IoU says nothing; trained weights give the meaningful IoU. With a nuclick-wsi checkpoint of another architecture, TIAToolbox's way runs
our network object through ``NuClick.infer_batch`` / ``postproc`` (they take any ``nn.Module``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def resolve_weights(spec: str, tmp: Path, seed: int) -> Path:
    """A local weights file for ``spec`` (``random`` writes seeded TIAToolbox NuClick weights)."""
    import torch

    if spec == "random":
        from tiatoolbox.models.architecture.nuclick import NuClick

        torch.manual_seed(seed)
        path = tmp / "nuclick_random.pth"
        torch.save(NuClick(num_input_channels=5, num_output_channels=1).state_dict(), path)
        return path
    if spec.startswith("tiatoolbox:"):
        from nuclick_wsi.model.tiatoolbox_weights import tiatoolbox_weights_path

        return tiatoolbox_weights_path(spec)[0]
    return Path(spec)


def tiatoolbox_network(path: Path, loaded):
    """TIAToolbox's own network class with the weights, or (another architecture) our network."""
    import torch

    if loaded.arch == "nuclick":
        from tiatoolbox.models.architecture.nuclick import NuClick

        net = NuClick(num_input_channels=5, num_output_channels=1)
        net.load_state_dict(loaded.net.state_dict(), strict=True)
        return net.eval(), "tiatoolbox NuClick"
    if loaded.arch == "tia-light-unet":
        from tiatoolbox.models.architecture.unet import UNetModel

        unet = UNetModel(num_input_channels=5, num_output_channels=1, encoder="unet",
                         encoder_levels=[32, 64, 128, 256], decoder_block=[3, 3], skip_type="add")
        unet.load_state_dict(loaded.net.state_dict(), strict=True)

        class Scaled(torch.nn.Module):  # its forward divides by 255: feed what its users feed
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x * 255.0)

        return Scaled(unet).eval(), "tiatoolbox UNetModel (nuclick_light-pannuke layout)"
    return loaded.net.eval(), f"nuclick-wsi {loaded.arch} (no TIAToolbox class for it)"


def tiatoolbox_way(slide: Path, clicks: np.ndarray, bounds: tuple[int, int], net, model_mpp: float,
                   patch: int, post: dict, device: str, mpp: float | None) -> dict:
    """Segment each click TIAToolbox's way; return masks with their level-0 placement and timings."""
    import torch
    from tiatoolbox.models.architecture.nuclick import NuClick
    from tiatoolbox.wsicore.wsireader import WSIReader

    wsi = WSIReader.open(slide, mpp=(mpp, mpp) if mpp else None)
    slide_mpp = float(np.mean(wsi.info.mpp))
    s = model_mpp / slide_mpp  # level-0 px per model px
    pts = clicks + np.asarray(bounds, float)  # OpenSlide level-0 frame (TIAToolbox does not crop)
    net.to(device)
    out, t_read, t_infer, t_post = [], 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    for k, (x, y) in enumerate(pts):
        t = time.perf_counter()
        loc = (int(round(x - patch / 2 * s)), int(round(y - patch / 2 * s)))
        rgb = wsi.read_rect(loc, (patch, patch), resolution=model_mpp, units="mpp")
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        incl = np.zeros((patch, patch), np.float32)
        excl = np.zeros((patch, patch), np.float32)
        cx, cy = np.clip(((np.array([x, y]) - loc) / s).astype(int), 0, patch - 1)
        incl[cy, cx] = 1
        near = (pts - loc) / s
        for j in np.flatnonzero(np.all((near >= 0) & (near < patch), axis=1)):
            if j != k:
                excl[int(near[j, 1]), int(near[j, 0])] = 1
        inp = np.concatenate([rgb.astype(np.float32).transpose(2, 0, 1) / 255.0, incl[None], excl[None]])
        prob = NuClick.infer_batch(net, torch.from_numpy(inp[None]), device=device)
        t_infer += time.perf_counter() - t
        t = time.perf_counter()
        mask = NuClick.postproc(prob, thresh=post["threshold"], min_size=int(post["min_object_px"]),
                                min_hole_size=int(post["min_hole_px"]), nuc_points=incl[None],
                                do_reconstruction=True)[0]
        t_post += time.perf_counter() - t
        out.append((loc, mask))
    total = time.perf_counter() - t0
    return {"masks": out, "scale": s, "slide_mpp": slide_mpp, "seconds": total,
            "split_s": {"read": round(t_read, 2), "infer": round(t_infer, 2), "post": round(t_post, 2)},
            "reader": type(wsi).__name__}


def iou_per_click(tia: dict, labels, report: dict, bounds: tuple[int, int]) -> list[float | None]:
    """IoU in level-0 pixels between TIAToolbox's mask and our instance, per click (None: neither)."""
    s = tia["scale"]
    bx, by = bounds
    ious: list[float | None] = []
    for (loc, mask), rec in zip(tia["masks"], report["clicks"]):
        side = int(np.ceil(mask.shape[0] * s)) + 2
        u0, v0 = int(np.floor(loc[0])), int(np.floor(loc[1]))
        uu, vv = np.meshgrid(np.arange(u0, u0 + side), np.arange(v0, v0 + side))
        j = np.floor((uu + 0.5 - loc[0]) / s).astype(int)
        i = np.floor((vv + 0.5 - loc[1]) / s).astype(int)
        inside = (i >= 0) & (i < mask.shape[0]) & (j >= 0) & (j < mask.shape[1])
        a = np.zeros(uu.shape, bool)
        a[inside] = mask[i[inside], j[inside]]
        inst = rec.get("instance_id")
        # our labels are in QuPath's frame: OpenSlide level 0 minus the bounds offset
        y0, x0 = max(v0 - by, 0), max(u0 - bx, 0)
        y1, x1 = min(v0 - by + side, labels.shape[0]), min(u0 - bx + side, labels.shape[1])
        b = np.zeros(uu.shape, bool)
        if inst is not None and y1 > y0 and x1 > x0:
            b[y0 - (v0 - by):y1 - (v0 - by), x0 - (u0 - bx):x1 - (u0 - bx)] = labels[y0:y1, x0:x1] == inst
        area_b = rec.get("area_px") or 0  # the whole instance, also any part outside the box
        inter = int(np.count_nonzero(a & b))
        union = int(a.sum()) + int(max(area_b, b.sum())) - inter
        ious.append(inter / union if union else None)
    return ious


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, default=ROOT / "examples" / "CMU-1-Small-Region.svs")
    ap.add_argument("--points", type=Path, default=ROOT / "examples" / "CMU-1-Small-Region.clicks.geojson")
    ap.add_argument("--clicks", type=int, default=100, help="first N clicks of --points (default 100)")
    ap.add_argument("--weights", default="tiatoolbox:nuclick_original-pannuke",
                    help="tiatoolbox:NAME, a .pth / nuclick-wsi checkpoint, or 'random'")
    ap.add_argument("--mpp", type=float, default=None, help="slide um/px, for slides without one")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=64, help="nuclick-wsi's batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from nuclick_wsi.io.annotations import read_prompts
    from nuclick_wsi.errors import NuclickError
    from nuclick_wsi.model.weights import load_model
    from nuclick_wsi.io.slides.registry import open_slide
    from nuclick_wsi.store.labels import open_labels

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vs_tia_") as tmpdir:
        tmp = Path(tmpdir)
        try:
            wpath = resolve_weights(args.weights, tmp, args.seed)
            loaded = load_model(wpath)
        except NuclickError as exc:
            print(f"error: {exc}\n(offline? --weights random compares speed and agreement without them)",
                  file=sys.stderr)
            return 2
        net, net_name = tiatoolbox_network(wpath, loaded)
        prompts = read_prompts(args.points)
        clicks = np.array([(c.x, c.y) for c in prompts.clicks[:args.clicks]], float)
        with open_slide(args.slide, mpp=args.mpp) as ours_slide:
            bounds = ours_slide.bounds_offset
        subset = tmp / "clicks.csv"
        subset.write_text("x,y\n" + "".join(f"{x!r},{y!r}\n" for x, y in clicks))

        # TIAToolbox's way (in this process)
        tia = tiatoolbox_way(args.slide, clicks, bounds, net, loaded.mpp, loaded.patch_size,
                             loaded.postprocess, args.device, args.mpp)

        # nuclick-wsi segment (a child process, as a user runs it)
        out = tmp / "out"
        cmd = [sys.executable, "-m", "nuclick_wsi.cli", "segment", str(args.slide), "--points", str(subset),
               "-o", str(out), "--stem", "bench", "--weights", str(wpath), "-q", "--device", args.device,
               "--batch-size", str(args.batch_size)]
        if args.mpp:
            cmd += ["--mpp", str(args.mpp)]
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        ours_wall = time.perf_counter() - t
        report = json.loads((out / "bench.report.json").read_text())
        ious = iou_per_click(tia, open_labels(out / "bench.labels.zarr"), report, bounds)

    n = len(clicks)
    vals = np.array([v for v in ious if v is not None], float)
    ours_run = report["timings_s"]["wall"]
    res = {
        "slide": str(args.slide), "clicks": n, "weights": str(args.weights), "network (TIAToolbox's way)": net_name,
        "model_mpp": loaded.mpp, "slide_mpp": tia["slide_mpp"], "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "tiatoolbox": {"seconds": round(tia["seconds"], 2), "clicks_per_s": round(n / tia["seconds"], 2),
                       "split_s": tia["split_s"], "reader": tia["reader"],
                       "segmented": int(sum(m.any() for _, m in tia["masks"]))},
        "nuclick_wsi": {"seconds_in_run": ours_run, "clicks_per_s": round(n / ours_run, 2),
                        "seconds_command": round(ours_wall, 2), "clicks_per_s_command": round(n / ours_wall, 2),
                        "split_s": {k: v for k, v in report["timings_s"].items() if k not in ("wall", "nuclei_per_s")},
                        "reader": report["slide"]["reader"], "device": report["device"],
                        "segmented": report["totals"]["segmented"]},
        "speedup": round(tia["seconds"] / ours_run, 2),
        "speedup_command": round(tia["seconds"] / ours_wall, 2),
        "iou": {"mean": round(float(vals.mean()), 4) if vals.size else None,
                "median": round(float(np.median(vals)), 4) if vals.size else None,
                "min": round(float(vals.min()), 4) if vals.size else None,
                "share_over_0.9": round(float((vals > 0.9).mean()), 4) if vals.size else None,
                "clicks_compared": int(vals.size)},
    }
    print(f"{n} clicks on {args.slide.name} ({tia['slide_mpp']:.4g} um/px, model {loaded.mpp} um/px), "
          f"weights {args.weights}, {args.device}, {res['torch_threads']} torch threads")
    print(f"  TIAToolbox's way ({net_name}): {res['tiatoolbox']['clicks_per_s']:8.2f} clicks/s "
          f"({tia['seconds']:.1f} s: read {tia['split_s']['read']} / infer {tia['split_s']['infer']} / "
          f"post {tia['split_s']['post']})")
    print(f"  nuclick-wsi segment:        {res['nuclick_wsi']['clicks_per_s']:8.2f} clicks/s "
          f"({ours_run:.1f} s in the run; {ours_wall:.1f} s for the whole command: "
          f"{res['nuclick_wsi']['clicks_per_s_command']:.2f} clicks/s)")
    print(f"  ratio nuclick-wsi / TIAToolbox: {res['speedup']:.2f}x (whole command: {res['speedup_command']:.2f}x)")
    print(f"  IoU per click: mean {res['iou']['mean']}, median {res['iou']['median']}, min {res['iou']['min']}, "
          f"> 0.9 for {res['iou']['share_over_0.9']} of {res['iou']['clicks_compared']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
