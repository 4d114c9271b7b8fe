"""Builders the tests share: stand-in networks and models, generated slides, cohorts.

Test modules import these from here (never from conftest.py or from each other); conftest.py
holds only fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from torch import nn

from nuclick_wsi._util.fs import TMP_MARK
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.outputs.report import comparable_digests
from nuclick_wsi.workflows.qupath_project import safe_name

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""
DATA = Path(__file__).resolve().parent / "data"
"""Small files the tests read (tests/data)."""
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.exists():  # CI clones the repo with ../shared beside it; allow an override
    SHARED = Path(os.environ.get("NUCLICK_SHARED_DATA", SHARED))


# --------------------------------------------------------------------------------------------------
# stand-in networks and models


def centre_distance(h: int, w: int) -> torch.Tensor:
    """(h, w) distances of every pixel from the patch centre (where the click is), float32."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.sqrt((yy - h // 2) ** 2 + (xx - w // 2) ** 2)


class DiskNet(nn.Module):
    """A stand-in network whose probability is a disk of ``radius`` model pixels around the click.

    The logit falls linearly with the distance from the patch centre (where the click is), so where
    two disks overlap the nearer click has the higher probability.
    """

    def __init__(self, radius: float = 6.0) -> None:
        super().__init__()
        self.radius = radius
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        d = centre_distance(h, w)
        logit = 2.0 * (self.radius - d) + self.dummy
        return logit.expand(n, 1, h, w).clone()


def random_state_dict(shapes, seed: int, *, std=lambda shape: 0.02, batches_tracked: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for a published key layout {key: shape}, as ``torch.save(model.state_dict())`` gives.

    BatchNorm counters get ``batches_tracked``, running variances U(0.5, 1.5), everything else
    N(0, std(shape)^2).
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(batches_tracked, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=gen) * std(shape)
    return sd


def disk_model(radius: float = 6.0, mpp: float = 0.25, **post) -> LoadedModel:
    """A LoadedModel around :class:`DiskNet` (threshold 0.5 -> pixels within ``radius`` of the click)."""
    meta = {"mpp": mpp, "patch_size": 128, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 1, "min_hole_px": 0, **post}}
    return LoadedModel(net=DiskNet(radius).eval(), arch="test-disk", arch_args={}, metadata=meta, source="test:disk")


class GuidedDiskNet(nn.Module):
    """A disk around the click, cut back near the other clicks of the exclusion map and perturbed by a
    small random convolution of every input channel: every bit of its output depends on the image, the
    guidance and the fp32 kernels, as a real network's does (for reruns that must equal fresh runs)."""

    def __init__(self, radius: float = 7.0, seed: int = 0) -> None:
        super().__init__()
        self.radius = radius
        self.conv = nn.Conv2d(5, 1, 3, padding=1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        d = centre_distance(h, w)
        near_other = nn.functional.max_pool2d(x[:, 4:5], 7, stride=1, padding=3)
        return 2.0 * (self.radius - d) - 20.0 * near_other + self.conv(x)


def guided_model(radius: float = 7.0, mpp: float = 0.25, seed: int = 0, **post) -> LoadedModel:
    """A LoadedModel around :class:`GuidedDiskNet`."""
    meta = {"mpp": mpp, "patch_size": 128, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 1, "min_hole_px": 0, **post}}
    return LoadedModel(net=GuidedDiskNet(radius, seed).eval(), arch="test-guided", arch_args={}, metadata=meta,
                       source="test:guided")


def write_tiff_slide(path: Path, width: int, height: int, mpp: float | None, *, tile: int = 256,
                     rgb: np.ndarray | None = None) -> Path:
    """A tiled pyramidal TIFF (levels 1, 2, 4...) with resolution tags for ``mpp`` (None: no tags)."""
    import tifffile

    if rgb is None:
        rng = np.random.default_rng(0)
        rgb = np.full((height, width, 3), 230, np.uint8)
        rgb[..., 1] = 200 + rng.integers(0, 20, (height, width), dtype=np.uint8)
    levels = [rgb]
    while min(levels[-1].shape[:2]) > 2 * tile:
        levels.append(levels[-1][::2, ::2])
    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lev in enumerate(levels):
            res = {} if not kw else {"resolution": (kw["resolution"][0] / 2 ** i, kw["resolution"][1] / 2 ** i),
                                     "resolutionunit": "CENTIMETER"}
            tw.write(lev, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=1 if i else 0, **res)
    return path


class DarkNet(nn.Module):
    """A stand-in network that finds dark tissue: positive logit where the RGB mean is below 0.5.

    Unlike :class:`DiskNet` it looks at the image, so it tells whether the right pixels were read
    (e.g. in QuPath's frame on a slide with OpenSlide bounds).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (0.5 - x[:, :3].mean(dim=1, keepdim=True)) + self.dummy


def dark_model(mpp: float = 0.5) -> LoadedModel:
    """A LoadedModel around :class:`DarkNet` (an instance = the dark blob under the click)."""
    meta = {"mpp": mpp, "patch_size": 128, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 1, "min_hole_px": 0}}
    return LoadedModel(net=DarkNet().eval(), arch="test-dark", arch_args={}, metadata=meta, source="test:dark")


def write_leica_scn(path: Path, rgb: np.ndarray, offset: tuple[int, int] = (40, 60),
                    canvas: tuple[int, int] = (400, 320), mpp: float = 0.5) -> Path:
    """A minimal Leica SCN: ``rgb`` (h, w, even sizes) placed at ``offset`` px of a ``canvas``.

    OpenSlide's leica driver reports ``openslide.bounds-x/-y`` = ``offset`` and a full level 0 of
    ``canvas`` (w, h), so QuPath (OpenSlide server, cropped to the bounds) sees ``rgb`` at (0, 0)
    while OpenSlide's level 0 has it at ``offset``: the smallest slide with non-zero bounds that
    can be written here (MRXS cannot). Two levels (1 and 2x), 64 px tiles.
    """
    import tifffile

    h, w = rgb.shape[:2]
    nm = 50  # nanometres per pixel in the SCN XML's collection/view frame
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
 <collection name="t" uuid="c1" sizeX="{canvas[0] * nm}" sizeY="{canvas[1] * nm}">
  <barcode>TEST</barcode>
  <image name="main" uuid="i1">
   <creationDate>2020-01-01T00:00:00Z</creationDate>
   <device model="Leica SCN400" version="1.0"/>
   <pixels sizeX="{w}" sizeY="{h}">
     <dimension sizeX="{w}" sizeY="{h}" r="0" ifd="0"/>
     <dimension sizeX="{w // 2}" sizeY="{h // 2}" r="1" ifd="1"/>
   </pixels>
   <view sizeX="{w * nm}" sizeY="{h * nm}" offsetX="{offset[0] * nm}" offsetY="{offset[1] * nm}" spacingZ="0"/>
   <scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>
   <illuminationSettings><numericalAperture>0.4</numericalAperture>
   <illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>
  </image>
 </collection>
</scn>"""
    half = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    res = 1e4 / mpp
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(64, 64), photometric="rgb", description=xml,
                 resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
        tw.write(half, tile=(64, 64), photometric="rgb",
                 resolution=(res / 2, res / 2), resolutionunit="CENTIMETER", metadata=None)
    return path


# --------------------------------------------------------------------------------------------------
# cohorts (batch and Snakemake tests)


NUCLICK = [sys.executable, "-m", "nuclick_wsi.cli"]
#: every subprocess runs torch on one thread, so CPU results cannot depend on the thread count
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_weights(path: Path) -> Path:
    """A small random light U-Net checkpoint whose threshold makes it segment something."""
    from nuclick_wsi.model.architectures.unet import LightUNet
    from nuclick_wsi.model.weights import save_checkpoint

    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, LightUNet((8, 16, 32, 64)), "light-unet", {"widths": [8, 16, 32, 64]},
                        {"mpp": 0.25, "patch_size": 128, "task": "nuclei", "postprocess": {"threshold": 0.3}})
    return path


def make_cohort(root: Path, n: int = 2, clicks: int = 5, size: tuple[int, int] = (384, 320), weights: bool = True,
                name: str = "manifest.csv") -> Path:
    """``n`` tiny slides with clicks under ``root``, and a manifest with relative paths."""
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "clicks").mkdir(exist_ok=True)
    lines = ["slide,points,weights" if weights else "slide,points"]
    if weights:
        make_weights(root / "w.pt")
    for k in range(n):
        slide = root / "slides" / f"s{k}.tif"
        if not slide.exists():
            write_tiff_slide(slide, *size, 0.25)
        rng = np.random.default_rng(100 + k)
        xy = rng.uniform(12, min(size) - 12, (clicks, 2))
        (root / "clicks" / f"s{k}.csv").write_text("x,y\n" + "".join(f"{x:.1f},{y:.1f}\n" for x, y in xy))
        lines.append(f"slides/s{k}.tif,clicks/s{k}.csv" + (",w.pt" if weights else ""))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def deterministic_files(out: Path) -> dict[str, str]:
    """sha256 of every output that must be byte-identical run to run (not reports, QC pages, commit markers,
    summary, logs)."""
    got = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if (p.is_dir() or rel.startswith("logs/") or rel.endswith((".report.json", ".qc.html", ".nuclick-commit.json"))
                or rel in ("batch-summary.csv", "index.html")):
            continue
        got[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return got


def leftovers(out: Path) -> list[str]:
    """Temporaries and lock files anywhere under ``out``."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.name.startswith(TMP_MARK) or p.name.endswith(".lock"))


def batch_cli(manifest: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NUCLICK, "batch", str(manifest), "-o", str(out), *args], env=SUB_ENV,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------------
# QuPath-shaped project files

OPENSLIDE = "qupath.lib.images.servers.openslide.OpenslideServerBuilder"


def file_uri(path: Path) -> str:
    """A file URI as Java's File.toURI writes it (``file:/a/b%20c.tif``)."""
    return "file:" + quote(str(path.resolve()), safe="/()")


def entry(path: Path | None, name: str, *, provider: str = OPENSLIDE, args=(), size=None, uri=None,
          entry_id: int = 1, builder_type: str = "uri", mpp: float | None = 0.25) -> dict:
    """One images[] entry as QuPath 0.5/0.6 writes it."""
    meta = {"name": name, "sizeZ": 1, "sizeT": 1, "channelType": "DEFAULT", "isRGB": True, "pixelType": "UINT8"}
    if size is not None:
        meta.update(width=size[0], height=size[1])
    if mpp is not None:
        meta["pixelCalibration"] = {"pixelWidth": {"value": mpp, "unit": "µm"},
                                    "pixelHeight": {"value": mpp, "unit": "µm"},
                                    "zSpacing": {"value": 1.0, "unit": "z-slice"}, "timeUnit": "SECONDS", "timepoints": []}
    builder = {"builderType": builder_type, "providerClassName": provider,
               "uri": uri if uri is not None else file_uri(path), "args": list(args), "metadata": meta}
    return {"serverBuilder": builder, "entryID": entry_id, "randomizedName": f"uuid-{entry_id}",
            "imageName": name, "metadata": {}}


def write_project(folder: Path, entries: list[dict], uri: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"version": "0.6.0", "createTimestamp": 1, "modifyTimestamp": 1,
           "uri": uri or file_uri(folder / "project.qpproj"), "lastID": len(entries), "images": entries}
    path = folder / "project.qpproj"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def point_feature(x: float, y: float, cls: str | None = None) -> dict:
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "0b1c0e37-0000-4000-8000-000000000000",
            "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props}


def write_clicks(project: Path, name: str, features: list[dict]) -> Path:
    """PROJECT/nuclick/clicks/<name>.geojson as export_clicks.groovy writes it."""
    folder = project.parent / "nuclick" / "clicks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(name)}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# slides with outlined nuclei (training from slides: training/regions.py, export-training)


def blob_slide(folder: Path, *, width: int = 700, height: int = 520, mpp: float = 0.5, n: int = 40,
               seed: int = 0, classes: tuple[str, ...] = ("Tumor", "Stroma")) -> tuple[Path, Path, list]:
    """A pyramidal TIFF with dark elliptic nuclei on pink, and their outlines as a QuPath GeoJSON.

    Returns (slide, outlines file, shapely polygons in level-0 px, in file order). Ellipses do not touch.
    """
    from shapely import affinity
    from shapely.geometry import Point

    from nuclick_wsi.io.annotations import write_qupath
    from nuclick_wsi.records import Instance

    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = (235, 195, 215)
    taken = np.zeros((height, width), bool)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    polys = []
    while len(polys) < n:
        cx, cy = rng.uniform(12, width - 12), rng.uniform(12, height - 12)
        rx, ry = rng.uniform(3.5, 7.0, 2)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.4
        if taken[inside].any():
            continue
        taken |= inside
        rgb[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = (80, 45, 130)
        polys.append(affinity.scale(Point(cx, cy).buffer(1.0, 16), rx, ry))
    slide = write_tiff_slide(folder / "blobs.tif", width, height, mpp, rgb=rgb)
    outlines = folder / "blobs.outlines.geojson"
    write_qupath([Instance(label=k, uuid=f"n{k}", geometry=p, class_name=classes[k % len(classes)])
                  for k, p in enumerate(polys, 1)], outlines)
    return slide, outlines, polys


def labels_at_pixel_centres(geoms: list, x0: float, y0: float, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels (1..n in order, later ones on top) from pixel-centre containment, computed with shapely:
    pixel (i, j) has its centre at level-0 (x0 + (j + 0.5) * scale, y0 + (i + 0.5) * scale)."""
    import shapely

    jj, ii = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    xs, ys = x0 + (jj + 0.5) * scale, y0 + (ii + 0.5) * scale
    out = np.zeros(shape, np.int32)
    for k, g in enumerate(geoms, 1):
        out[shapely.contains_xy(g, xs, ys)] = k
    return out


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Instance labels renumbered by first appearance in raster order (compare partitions, not ids)."""
    ids, first = np.unique(labels.ravel(), return_index=True)
    order = ids[np.argsort(first)]
    order = order[order > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[order] = np.arange(1, len(order) + 1)
    return lut[labels]


class RecordingSource:
    """A slide source wrapper that records the level-0 size of every region read."""

    def __init__(self, source) -> None:
        self.source = source
        self.sizes: list[tuple[float, float]] = []

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read_region(self, x, y, w, h, ow, oh):
        self.sizes.append((w, h))
        return self.source.read_region(x, y, w, h, ow, oh)

    def close(self) -> None:
        self.source.close()


def segmented_blobs(folder: Path) -> tuple[Path, Path]:
    """:func:`blob_slide` (0.5 um/px, 50 nuclei) segmented by :func:`dark_model` at 0.25 um/px from clicks at the
    nuclei (classes Tumor/Stroma from the clicks); returns (slide, segment output folder)."""
    from nuclick_wsi.pipeline import Models, SegmentOptions, segment

    slide, _, polys = blob_slide(folder, n=50)
    clicks = folder / "clicks.csv"
    clicks.write_text("x,y,class\n" + "".join(f"{p.centroid.x:.2f},{p.centroid.y:.2f},{'Tumor' if k % 3 else 'Stroma'}\n"
                                             for k, p in enumerate(polys)))
    out = folder / "out"
    segment(slide, clicks, out, options=SegmentOptions(progress=False, device="cpu"),
            models=Models(nuclei=dark_model(mpp=0.25)))
    return slide, out


def roi_file(path: Path, *geoms) -> Path:
    """A QuPath GeoJSON of area annotations (shapely polygons)."""
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [list(g.exterior.coords)]},
              "properties": {"objectType": "annotation"}} for g in geoms]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


# proposal detector stand-ins


class SpotNet(nn.Module):
    """A stand-in proposal detector: a heatmap peak (stride 2) at the centre of each small dark spot.

    Darkness (RGB mean below 0.6) is pooled 2x2 and blurred by a Gaussian of 2 heatmap pixels, so a
    spot smaller than the blur gives one maximum, at its centre.
    """

    widths = (16, 32, 64, 128)

    def __init__(self) -> None:
        super().__init__()
        k = torch.arange(-4, 5, dtype=torch.float32)
        g = torch.exp(-(k[:, None] ** 2 + k[None] ** 2) / 8.0)
        self.register_buffer("kernel", (g / g.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = torch.relu(0.6 - x[:, :3].mean(dim=1, keepdim=True))
        h = torch.nn.functional.avg_pool2d(dark, 2)
        return 80.0 * (torch.nn.functional.conv2d(h, self.kernel, padding=4) - 0.03)


def spot_detector(mpp: float = 0.5, threshold: float = 0.5) -> LoadedModel:
    """A LoadedModel (task "detect") around :class:`SpotNet`."""
    meta = {"mpp": mpp, "patch_size": 256, "task": "detect",
            "postprocess": {"threshold": threshold, "min_distance_um": 2.0}}
    return LoadedModel(net=SpotNet().eval(), arch="test-spot", arch_args={}, metadata=meta, source="test:spot")


def spot_slide_rgb(width: int, height: int, spots, *, tissue=None, radius: float = 7.0) -> np.ndarray:
    """A white slide with pink tissue rectangles ``tissue`` [(x0, y0, x1, y1)] and dark spots at ``spots`` (x, y)."""
    rgb = np.full((height, width, 3), 250, np.uint8)
    for x0, y0, x1, y1 in tissue if tissue is not None else [(0, 0, width, height)]:
        rgb[y0:y1, x0:x1] = (235, 190, 215)
    yy, xx = np.mgrid[0:height, 0:width]
    for x, y in spots:
        r0, r1 = max(int(y - radius - 1), 0), min(int(y + radius + 2), height)
        c0, c1 = max(int(x - radius - 1), 0), min(int(x + radius + 2), width)
        m = (xx[r0:r1, c0:c1] + 0.5 - x) ** 2 + (yy[r0:r1, c0:c1] + 0.5 - y) ** 2 <= radius ** 2
        rgb[r0:r1, c0:c1][m] = (90, 50, 140)
    return rgb


# --------------------------------------------------------------------------------------------------
# incremental reruns (tests/engine/test_rerun.py, tests/workflows/test_watch.py)


def grid_clicks(width, height, step=45.0, seed=0):
    """Clicks on a jittered grid, two classes, positions to 0.01 px."""
    rng = np.random.default_rng(seed)
    out = []
    for y in np.arange(20, height - 20, step):
        for x in np.arange(20, width - 20, step):
            jx, jy = rng.uniform(-8, 8, 2)
            out.append((round(x + jx, 2), round(y + jy, 2), "AB"[int(rng.integers(2))]))
    return out


def write_clicks_csv(path: Path, clicks) -> Path:
    """A CSV clicks file (x,y,class) of (x, y, class) tuples."""
    path.write_text("x,y,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in clicks))
    return path


#: sha256 of every output; the report's without timings, device, rerun section and output paths
outputs = comparable_digests


def ids_by_click(report) -> dict[tuple, tuple]:
    return {(r["x"], r["y"], r["class"]): (r["instance_id"], r.get("uuid")) for r in report["clicks"]}
