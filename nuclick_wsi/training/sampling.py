"""Training samples: NuClick clicks, guided patches and augmentation.

Each time a nucleus is drawn, a new click is sampled inside it, at least 2 px from its edge where
possible; the exclusion map holds the centroids of the other objects in the patch. Geometric
augmentation (rotation, scale, flips) is done about the patch centre, so the click stays at the
centre pixel exactly as at inference time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from nuclick_wsi.io.datasets import Tile

#: H&E stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as in Ruifrok & Johnston.
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)


def click_candidates(mask: np.ndarray, min_dist: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels of ``mask`` farther than ``min_dist`` from the background.

    The innermost pixels when the object is too thin for that margin.
    """
    dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ok = dist > min_dist
    if not ok.any():
        ok = dist >= dist.max()
    return np.nonzero(ok)


def sample_click(mask: np.ndarray, rng: np.random.Generator, min_dist: float = 2.0) -> tuple[int, int]:
    """A random pixel (row, col) among :func:`click_candidates`."""
    rr, cc = click_candidates(mask, min_dist)
    k = rng.integers(len(rr))
    return int(rr[k]), int(cc[k])


def centroid_click(mask: np.ndarray) -> tuple[int, int]:
    """The pixel at the object's centroid, or its innermost pixel when the centroid falls outside it."""
    r, c = (int(v) for v in ndi.center_of_mass(mask))
    if not mask[r, c]:
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = (int(v) for v in np.unravel_index(np.argmax(d), d.shape))
    return r, c


class PatchSampler:
    """Draws NuClick training samples from tiles.

    Parameters
    ----------
    tiles : list of Tile
    patch : int
        Output patch side (128 for nuclei).
    margin : int
        Extra context read around the patch so rotations and zooms have data to sample.
    """

    def __init__(self, tiles: list[Tile], patch: int = 128, margin: int = 48, seed: int = 0,
                 exclusion_drop: float = 0.1) -> None:
        self.tiles = tiles
        self.patch = patch
        self.margin = margin
        self.exclusion_drop = exclusion_drop
        self.rng = np.random.default_rng(seed)
        self.index = [(t, int(i)) for t, tile in enumerate(tiles) for i in tile.targets]
        self._objects = []
        for tile in tiles:
            slices = ndi.find_objects(tile.labels)
            self._objects.append(slices)
        if not self.index:
            raise ValueError("no clickable objects in the training tiles")

    def __len__(self) -> int:
        return len(self.index)

    def _crop(self, tile: Tile, cy: int, cx: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = tile.labels.shape
        half = size // 2
        y0, x0 = cy - half, cx - half
        img = np.full((size, size, 3), 255, np.uint8)
        lab = np.zeros((size, size), np.int32)
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + size, h), min(x0 + size, w)
        img[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile.image[sy0:sy1, sx0:sx1]
        lab[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile.labels[sy0:sy1, sx0:sx1]
        return img, lab

    def draw(self, n: int, *, click_at_centroid: bool = False, items: list[tuple[int, int]] | None = None):
        """Draw ``n`` raw samples: big crops centred on the click, target id, other centroids.

        Returns arrays ``img`` (n, S, S, 3) uint8, ``lab`` (n, S, S) int32, ``target`` (n,) and a list of
        (k, 2) arrays of other objects' centroids relative to the crop centre (x, y).
        """
        size = self.patch + 2 * self.margin
        if items is None:
            picks = self.rng.integers(len(self.index), size=n)
            items = [self.index[p] for p in picks]
        imgs = np.empty((len(items), size, size, 3), np.uint8)
        labs = np.empty((len(items), size, size), np.int32)
        others = []
        for k, (t, oid) in enumerate(items):
            tile = self.tiles[t]
            sl = self._objects[t][oid - 1]
            mask = tile.labels[sl] == oid
            if click_at_centroid:
                r, c = centroid_click(mask)
            else:
                r, c = sample_click(mask, self.rng)
            cy, cx = sl[0].start + r, sl[1].start + c
            imgs[k], labs[k] = self._crop(tile, cy, cx, size)
            ids = np.unique(labs[k])
            rel = [
                (tile.centroids[i][0] - cx, tile.centroids[i][1] - cy)  # both in pixel-index coordinates
                for i in ids if i > 0 and i != oid and int(i) in tile.centroids
            ]
            arr = np.asarray(rel, np.float32).reshape(-1, 2)
            if self.exclusion_drop and len(arr) and not click_at_centroid:
                arr = arr[self.rng.random(len(arr)) >= self.exclusion_drop]
            others.append(arr)
        targets = np.asarray([oid for _, oid in items], np.int64)
        return imgs, labs, targets, others


def make_batch(sampler: PatchSampler, n: int, *, augment: bool = True, click_at_centroid: bool = False,
               items=None, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch: inputs (n, 5, P, P), target masks and other-object masks (n, 1, P, P)."""
    rng = rng or sampler.rng
    imgs, labs, targets, others = sampler.draw(n, click_at_centroid=click_at_centroid, items=items)
    n = len(imgs)
    size, p = imgs.shape[1], sampler.patch
    img = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)
    lab = torch.from_numpy(labs).unsqueeze(1).float()
    if augment:
        angle = torch.from_numpy(rng.uniform(0, 2 * math.pi, n)).float()
        scale = torch.from_numpy(np.exp(rng.uniform(math.log(0.8), math.log(1.25), n))).float()
        flip = torch.from_numpy(rng.random(n) < 0.5).float() * -2 + 1
    else:
        angle, scale, flip = torch.zeros(n), torch.ones(n), torch.ones(n)
    # output pixel u (normalised to the crop) = R * S * output grid, about the centre pixel.
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    f = p / size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * f * flip, -sin * f
    theta[:, 1, 0], theta[:, 1, 1] = sin * f * flip, cos * f
    # the centre pixel of the output (index p//2) must sample the centre pixel of the crop (index size//2)
    off_out = (p // 2 + 0.5) / p * 2 - 1
    off_in = (size // 2 + 0.5) / size * 2 - 1
    theta[:, 0, 2] = off_in - (theta[:, 0, 0] * off_out + theta[:, 0, 1] * off_out)
    theta[:, 1, 2] = off_in - (theta[:, 1, 0] * off_out + theta[:, 1, 1] * off_out)
    grid = F.affine_grid(theta, (n, 1, p, p), align_corners=False)
    img_o = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lab_o = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    tgt = torch.from_numpy(targets).float().view(n, 1, 1, 1)
    g = (lab_o == tgt).float()
    g_other = ((lab_o > 0) & (lab_o != tgt)).float()
    incl = torch.zeros(n, 1, p, p)
    incl[:, 0, p // 2, p // 2] = 1
    excl = torch.zeros(n, 1, p, p)
    for k, rel in enumerate(others):
        if not len(rel):
            continue
        # crop-pixel offsets -> output offsets: inverse of the linear part (in pixels of the crop)
        a = np.array([[cos[k] * flip[k], -sin[k]], [sin[k] * flip[k], cos[k]]], np.float32)
        out = rel @ np.linalg.inv(a).T
        cx = np.floor(out[:, 0] + p // 2 + 0.5).astype(int)
        cy = np.floor(out[:, 1] + p // 2 + 0.5).astype(int)
        ok = (cx >= 0) & (cx < p) & (cy >= 0) & (cy < p)
        excl[k, 0, cy[ok], cx[ok]] = 1
    if augment:
        img_o = resolution_augment(img_o, rng)
        img_o = color_augment(img_o, rng)
    return torch.cat([img_o, incl, excl], dim=1), g, g_other


def _uniform(rng, lo: float, hi: float, shape: tuple[int, ...], device) -> torch.Tensor:
    """Uniform draws in [lo, hi) on ``device`` from a NumPy generator or a ``torch.Generator`` (device-side sampling)."""
    if isinstance(rng, torch.Generator):
        return torch.rand(shape, generator=rng, device=rng.device) * (hi - lo) + lo
    return torch.from_numpy(rng.uniform(lo, hi, shape)).float().to(device)


def resolution_augment(img: torch.Tensor, rng, p: float = 0.3) -> torch.Tensor:
    """Simulate slides scanned at 20x (or 30x) and upsampled to the model's resolution.

    A share ``p`` of the batch is downsampled by 2 (or 1.5) with area averaging and brought back with
    bilinear interpolation, which is what reading a 0.5 um/px slide at 0.25 um/px does. ``rng``: a NumPy
    generator or a ``torch.Generator`` on the batch's device.
    """
    pick = torch.nonzero(_uniform(rng, 0, 1, (img.shape[0],), img.device) < p).flatten()
    if not len(pick):
        return img
    size = img.shape[-2:]
    out = img.clone()
    half = len(pick) // 2
    for factor, sel in ((2.0, pick[:half]), (1.5, pick[half:])):
        if not len(sel):
            continue
        small = F.interpolate(img[sel], scale_factor=1 / factor, mode="area")
        out[sel] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return out


_NOISE_BANK: dict[tuple[int, ...], torch.Tensor] = {}


def _noise_like(img: torch.Tensor, rng) -> torch.Tensor:
    """Unit Gaussian noise shaped like ``img``.

    On a device generator, fresh draws. From a NumPy generator (CPU training), drawn from a fixed bank by
    random flips and offsets: torch's normal sampler costs as much as a forward pass on CPU, and a bank of
    4 batches rolled at random gives noise that is, for augmentation, as good as fresh.
    """
    if isinstance(rng, torch.Generator):
        return torch.randn(img.shape, generator=rng, device=rng.device)
    key = tuple(img.shape[1:])
    if key not in _NOISE_BANK:
        g = torch.Generator().manual_seed(1234)
        _NOISE_BANK[key] = torch.randn((256, *key), generator=g)
    bank = _NOISE_BANK[key]
    idx = torch.from_numpy(rng.integers(0, len(bank), img.shape[0]))
    shift = [int(v) for v in rng.integers(0, key[-1], 2)]
    return torch.roll(bank[idx], shifts=shift, dims=(-2, -1)).to(img.device)


def color_augment(img: torch.Tensor, rng) -> torch.Tensor:
    """Stain (HED) jitter, brightness, contrast, saturation, hue-like channel mixing, blur/sharpen, noise.

    ``rng``: a NumPy generator or a ``torch.Generator`` on the batch's device.
    """
    n = img.shape[0]
    dev = img.device

    def u(lo: float, hi: float, shape: tuple[int, ...] = (n, 1, 1, 1)) -> torch.Tensor:
        return _uniform(rng, lo, hi, shape, dev)

    # HED jitter in optical density
    hed = torch.from_numpy(_HED).to(dev)
    od = -torch.log((img * 255 + 1) / 256)
    conc = torch.einsum("nchw,dc->ndhw", od, torch.linalg.pinv(hed).T.contiguous())
    conc = conc * u(0.75, 1.25, (n, 3, 1, 1)) + u(-0.05, 0.05, (n, 3, 1, 1))
    od2 = torch.einsum("ndhw,dc->nchw", conc, hed)
    img = ((256 * torch.exp(-od2) - 1) / 255).clamp(0, 1)
    # brightness / contrast / saturation
    br, ct = u(-0.1, 0.1), u(0.75, 1.3)
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * ct + mean + br
    gray = img.mean(dim=1, keepdim=True)
    img = gray + (img - gray) * u(0.7, 1.3)
    # channel shuffle, rarely (the paper's augmentation; H&E rarely looks like that)
    shuffle = u(0, 1, (n, 1)) < 0.05
    perm = torch.where(shuffle, torch.argsort(u(0, 1, (n, 3)), dim=1), torch.arange(3, device=dev))
    img = torch.gather(img, 1, perm.view(n, 3, 1, 1).expand_as(img))
    # blur or sharpen
    kern = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=img.dtype, device=dev) / 16
    blurred = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kern.expand(3, 1, 3, 3), groups=3)
    img = img + u(-0.8, 0.8) * (blurred - img)  # <0 sharpen, >0 blur
    img = img + _noise_like(img, rng) * u(0, 0.03)
    return img.clamp(0, 1)
