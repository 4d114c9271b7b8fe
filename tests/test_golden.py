"""Golden outputs: ``segment`` gives the same bytes, file for file, as when the hashes were recorded.

Two runs: the example slide with its clicks, and a generated gland image with squiggles and clicks,
every output format. The stand-in networks give probabilities of exactly 0, 0.5 or 1 (logits of
-40, 0, +40), so the bytes do not depend on the CPU's floating-point kernels. ``report.json`` is
compared without its timings, device line and rerun section, with the run's folders replaced by
placeholders; the rerun state (``S.labels.zarr/nuclick-rerun/``) is not compared: its fingerprint
holds the slide's mtime and the CPU (tests/engine/test_rerun.py checks it).

Record new hashes (only when a change of the outputs is intended, and say so in the commit):
``NUCLICK_GOLDEN_RECORD=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from skimage import draw
from torch import nn

from tests.helpers import centre_distance, ROOT
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.pipeline import Models, SegmentOptions, segment

GOLDEN = ROOT / "tests" / "golden"
EXAMPLE = ROOT / "examples" / "CMU-1-Small-Region.svs"
EXAMPLE_CLICKS = ROOT / "examples" / "CMU-1-Small-Region.clicks.geojson"
RECORD = os.environ.get("NUCLICK_GOLDEN_RECORD") == "1"


class TernaryDiskNet(nn.Module):
    """Logit +40 within ``core`` model px of the patch centre, 0 out to ``radius``, -40 beyond;
    -40 also where the pixel is bright background (mean RGB > 0.85) outside the core."""

    def __init__(self, core: float, radius: float) -> None:
        super().__init__()
        self.core, self.radius = core, radius
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        d = centre_distance(h, w).expand(n, 1, h, w)
        logit = torch.where(d < self.core, 40.0, torch.where(d < self.radius, 0.0, -40.0))
        bright = x[:, :3].mean(dim=1, keepdim=True) > 0.85
        logit = torch.where(bright & (d >= self.core), -40.0, logit)
        return logit + self.dummy


class TernaryDarkNet(nn.Module):
    """Logit +40 on dark tissue (mean RGB < 0.55), 0 in between, -40 on pale (mean RGB >= 0.65)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :3].mean(dim=1, keepdim=True)
        return torch.where(m < 0.55, 40.0, torch.where(m < 0.65, 0.0, -40.0)) + self.dummy


def nuclei_model(mpp: float) -> LoadedModel:
    meta = {"mpp": mpp, "patch_size": 64, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 4, "min_hole_px": 3}}
    return LoadedModel(net=TernaryDiskNet(4.0, 7.0).eval(), arch="golden-disk", arch_args={}, metadata=meta,
                       source="test:golden-disk")


def gland_model() -> LoadedModel:
    meta = {"mpp": 0.5, "patch_size": 256, "task": "gland",
            "postprocess": {"threshold": 0.3, "min_object_px": 200, "min_hole_px": 300}}
    return LoadedModel(net=TernaryDarkNet().eval(), arch="golden-dark-gland", arch_args={}, metadata=meta,
                       source="test:golden-dark-gland")


def gland_image(tmp: Path) -> tuple[Path, Path]:
    """A 700 x 520 px tiled TIFF (0.5 um/px): a ring gland, a solid one and a long one; squiggles + clicks."""
    import tifffile

    h, w = 520, 700
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = (228, 182, 205)
    for cy, cx, ry, rx in ((150, 170, 70, 95), (140, 500, 50, 80), (390, 350, 60, 300)):
        rr, cc = draw.ellipse(cy, cx, ry, rx, (h, w))
        rgb[rr, cc] = (125, 70, 150)
    rr, cc = draw.ellipse(150, 170, 30, 45, (h, w))
    rgb[rr, cc] = (245, 238, 242)  # a lumen
    for y, x in ((140, 500), (400, 120), (60, 640)):
        rr, cc = draw.disk((y, x), 5, shape=(h, w))
        rgb[rr, cc] = (60, 30, 90)
    slide = tmp / "glands.tif"
    with tifffile.TiffWriter(slide) as tw:
        tw.write(rgb, tile=(128, 128), photometric="rgb", compression="zlib",
                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    ring = [[170 + 70 * math.cos(t), 150 + 50 * math.sin(t)] for t in np.linspace(0, 2 * math.pi, 30)]
    squiggles = [ring, [[470.5, 140.5], [500.5, 130.5], [530.5, 145.5]],
                 [[100.5, 390.5], [300.5, 395.5], [600.5, 385.5]], [[900.5, 900.5], [950.5, 950.5]]]
    clicks = [(500.5, 140.5), (120.5, 400.5), (640.5, 60.5), (641.5, 60.5), (20.5, 500.5)]
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": list(c)},
              "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
             for c in clicks]
    feats += [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": s},
               "properties": {"objectType": "annotation", "classification": {"name": "Gland", "color": [0, 160, 0]}}}
              for s in squiggles]
    points = tmp / "glands.geojson"
    points.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return slide, points


def digest(out: Path, places: dict[str, str]) -> dict[str, str]:
    """sha256 of every file under ``out`` but the rerun state (the report: of its JSON without timings,
    device line and rerun section)."""
    hashes = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if "/nuclick-rerun/" in rel:
            continue
        data = path.read_bytes()
        if rel.endswith(".report.json"):
            rep = json.loads(data)
            rep.pop("timings_s")
            rep.pop("device")
            rep.pop("rerun")
            text = json.dumps(rep, indent=1, sort_keys=True)
            for real, placeholder in places.items():
                text = text.replace(real, placeholder)
            data = text.encode()
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def check(name: str, hashes: dict[str, str]) -> None:
    path = GOLDEN / f"{name}.json"
    if RECORD:
        path.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert sorted(hashes) == sorted(want), "other output files than recorded"
    differ = [k for k in want if hashes[k] != want[k]]
    assert not differ, f"outputs differ from the golden run: {differ}"


OPTS = dict(formats=("qupath", "asap", "geoparquet"), progress=False, device="cpu", precision="fp32", chunk=256)


def test_example_slide_outputs_are_unchanged(tmp_path):
    out = tmp_path / "out"
    segment(EXAMPLE, EXAMPLE_CLICKS, out, options=SegmentOptions(**OPTS), models=Models(nuclei=nuclei_model(0.25)))
    check("example-slide", digest(out, {str(out): "OUT", str(ROOT): "ROOT"}))


def test_gland_image_outputs_are_unchanged(tmp_path):
    slide, points = gland_image(tmp_path)
    out = tmp_path / "out"
    segment(slide, points, out, options=SegmentOptions(**{**OPTS, "gzip": True}), models=Models(nuclei=nuclei_model(0.5), gland=gland_model()))
    check("gland-image", digest(out, {str(out): "OUT", str(tmp_path): "TMP"}))
