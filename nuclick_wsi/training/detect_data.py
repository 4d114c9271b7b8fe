"""Training data of the proposal detector: images with nucleus points, and random augmented patches.

A :class:`DetectionItem` is generic: an RGB image, the points (x, y pixels) of its nuclei, its um/px,
and optionally a ``valid`` mask of where *every* nucleus is clicked (outside it the image teaches
nothing; None: everywhere). Any source can make them: outlined tiles (centroids), binary masks (the
compact components' centroids, the merged blobs ignored), a QuPath file of clicks on an image (its
area annotations, when present, are the valid region), or, later, clicks on a slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.datasets import Tile, load_tile, pairs_except, read_rgb
from nuclick_wsi.model.architectures.detector import STRIDE


@dataclass
class DetectionItem:
    """One image with the points of its nuclei (see the module docstring)."""

    name: str
    image: np.ndarray  #: (H, W, 3) uint8
    points: np.ndarray  #: (n, 2) x, y in pixels (continuous frame: pixel (i, j) spans [j, j+1) x [i, i+1))
    mpp: float
    valid: np.ndarray | None = None  #: (H, W) bool, where every nucleus is clicked; None: everywhere
    labels: np.ndarray | None = None  #: (H, W) instance ids when known (scores "proposal inside a nucleus")
    source: str = ""

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, np.float64).reshape(-1, 2)
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise NuclickError(f"{self.source or self.name}: a detection item needs an (H, W, 3) uint8 image")
        if self.valid is not None and self.valid.shape != self.image.shape[:2]:
            raise NuclickError(f"{self.source or self.name}: valid mask and image differ in size")


def item_from_tile(tile: Tile, mpp: float, *, ignore_margin: int = 3) -> DetectionItem:
    """A tile's trusted objects as points; its other objects (merged blobs) and a margin around them ignored."""
    targets = set(int(t) for t in tile.targets)
    ids = [i for i in tile.centroids if i in targets]
    points = np.asarray([tile.centroids[i] for i in ids], np.float64).reshape(-1, 2)
    points = points + 0.5  # centre of mass of pixel indices -> continuous frame
    others = (tile.labels > 0) & ~np.isin(tile.labels, list(targets))
    valid = None
    if others.any():
        valid = ~ndi.binary_dilation(others, iterations=ignore_margin)
    return DetectionItem(tile.name, tile.image, points, tile.mpp or mpp, valid,
                         labels=tile.labels if valid is None else None, source=tile.source)


def item_from_clicks(image: Path, clicks: Path, mpp: float) -> DetectionItem | None:
    """An image and a QuPath/CSV file of clicks on it (None when the file holds no clicks).

    The file's area annotations, when it has any, are where every nucleus is clicked.
    """
    from nuclick_wsi.io.annotations import read_prompts
    from skimage.draw import polygon as fill_polygon

    prompts = read_prompts(clicks)
    if not prompts.clicks:
        return None
    rgb = read_rgb(image)
    valid = None
    if prompts.regions:
        valid = np.zeros(rgb.shape[:2], bool)
        for geom in prompts.regions:
            for poly in getattr(geom, "geoms", [geom]):
                xy = np.asarray(poly.exterior.coords)
                rr, cc = fill_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, valid.shape)
                valid[rr, cc] = True
    pts = np.asarray([(c.x, c.y) for c in prompts.clicks])
    return DetectionItem(image.stem, rgb, pts, mpp, valid, source=str(clicks))


def load_detection_items(data: list[str], *, exclude=(), use_binary: bool = True, mpp: float = 0.25,
                         log=print) -> list[DetectionItem]:
    """Items from dataset folders (``find_pairs`` layouts); ``mpp``: images whose files do not say."""
    items = []
    for img, ann, kind in pairs_except(data, exclude):
        if kind == "binary" and not use_binary:
            continue
        item = None
        if ann.suffix.lower() in (".geojson", ".json"):
            item = item_from_clicks(img, ann, mpp)
        if item is None:
            tile = load_tile(img, ann, kind=kind)
            tile.source = f"{ann} ({kind})"
            item = item_from_tile(tile, mpp)
        items.append(item)
    if not items:
        raise NuclickError(f"no training images found in {', '.join(data)}")
    log(f"loaded {len(items)} images, {sum(len(i.points) for i in items)} nucleus points")
    return items


def render_target(points: np.ndarray, side: int, sigma: float, stride: int = STRIDE) -> np.ndarray:
    """(side/stride)^2 heatmap target: a Gaussian (``sigma`` heatmap px) per point, 1 at its pixel."""
    n = side // stride
    target = np.zeros((n, n), np.float32)
    r = int(np.ceil(3 * sigma))
    for x, y in np.asarray(points, np.float64).reshape(-1, 2) / stride:
        c0, r0 = int(np.floor(x)), int(np.floor(y))
        rs, cs = slice(max(r0 - r, 0), min(r0 + r + 1, n)), slice(max(c0 - r, 0), min(c0 + r + 1, n))
        if rs.start >= rs.stop or cs.start >= cs.stop:
            continue
        yy, xx = np.mgrid[rs, cs]
        g = np.exp(-((xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2) / (2 * sigma ** 2))
        np.maximum(target[rs, cs], g, out=target[rs, cs])
        if 0 <= r0 < n and 0 <= c0 < n:
            target[r0, c0] = 1.0
    return target


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Stain (HED) and HSV jitter, sometimes a blur: the look of other labs and scanners."""
    from skimage.color import hed2rgb, hsv2rgb, rgb2hed, rgb2hsv

    img = rgb.astype(np.float32) / 255.0
    hed = rgb2hed(img)
    hed = hed * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, 3) + rng.uniform(-0.02, 0.02, 3) * strength
    img = np.clip(hed2rgb(hed), 0, 1)
    hsv = rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.04, 0.04) * strength) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength), 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength), 0, 1)
    img = hsv2rgb(hsv)
    mean = img.mean()
    img = (img - mean) * rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength) + mean
    if rng.random() < 0.3:
        img = ndi.gaussian_filter(img, (rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2), 0))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


class DetectionSampler:
    """Random patches of items at the detector's um/px: scale, flips, rotations, stain/HSV jitter, blur."""

    def __init__(self, items: list[DetectionItem], *, mpp: float, patch: int = 256, sigma_um: float = 1.5,
                 seed: int = 0, scale_range: tuple[float, float] = (0.8, 1.25)) -> None:
        if not items:
            raise NuclickError("no detection items to sample from")
        self.items, self.mpp, self.patch, self.scale_range = items, mpp, patch, scale_range
        self.sigma = sigma_um / (mpp * STRIDE)
        self.rng = np.random.default_rng(seed)
        areas = np.asarray([i.image.shape[0] * i.image.shape[1] * i.mpp ** 2 for i in items], np.float64)
        self.weights = areas / areas.sum()

    def __len__(self) -> int:
        return sum(len(i.points) for i in self.items)

    def crop(self, item: DetectionItem, augment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch RGB, target, weight) of one random window of ``item``."""
        rng, p = self.rng, self.patch
        s = np.exp(rng.uniform(*np.log(self.scale_range))) if augment else 1.0
        f = self.mpp / item.mpp * s  # item pixels per patch pixel
        side = int(round(p * f))
        h, w = item.image.shape[:2]
        if len(item.points) and rng.random() < 0.5:
            cx, cy = item.points[rng.integers(len(item.points))] + rng.uniform(-side / 3, side / 3, 2)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        img = np.full((side, side, 3), 255, np.uint8)
        valid = np.ones((side, side), bool)
        ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
        if ys.start < ys.stop and xs.start < xs.stop:
            img[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = item.image[ys, xs]
            if item.valid is not None:
                valid[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = item.valid[ys, xs]
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        img = F.interpolate(t, size=(p, p), mode="bilinear", antialias=f > 1, align_corners=False)[0]
        img = img.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        pts = (item.points - (x0, y0)) / f
        pts = pts[(pts > -p * 0.1).all(1) & (pts < p * 1.1).all(1)]
        target = render_target(pts, p, self.sigma)
        n = p // STRIDE
        idx = np.minimum(((np.arange(n) + 0.5) * side / n).astype(int), side - 1)
        weight = valid[np.ix_(idx, idx)].astype(np.float32)
        if augment:
            img = colour_jitter(img, rng)
        return img, target, weight

    def batch(self, n: int, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (n, 3, P, P) in [0, 1], target (n, 1, P/2, P/2), weight (same)) for ``n`` random patches."""
        imgs, tgts, wts = [], [], []
        for _ in range(n):
            item = self.items[self.rng.choice(len(self.items), p=self.weights)]
            img, tgt, wt = self.crop(item, augment)
            if augment:  # the same flip / rotation of image and maps (P and P/2 grids stay aligned)
                k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
                img, tgt, wt = (np.rot90(a, k) for a in (img, tgt, wt))
                if flip:
                    img, tgt, wt = img[:, ::-1], tgt[:, ::-1], wt[:, ::-1]
            imgs.append(np.ascontiguousarray(img))
            tgts.append(np.ascontiguousarray(tgt))
            wts.append(np.ascontiguousarray(wt))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.from_numpy(np.stack(tgts))[:, None], torch.from_numpy(np.stack(wts))[:, None]
