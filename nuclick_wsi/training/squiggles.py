"""Gland training samples: NuClick's squiggle sampler and guided patches built like inference's.

Squiggle (Koohbanani et al., 2020): distance transform ``D`` of the gland mask; a threshold
``tau`` drawn uniformly from ``[0, mu + sigma]`` (mean and standard deviation of ``D`` inside the
gland); the squiggle is the morphological skeleton of ``{D > tau}``. A new squiggle is drawn every
time a gland is drawn. A low ``tau`` gives a skeleton reaching far into the gland's lobes, a high
one a short stroke near its middle; a ring-shaped gland gives a loop round its hole.

Patch: the square box of :func:`nuclick_wsi.guidance.squiggles.square_box` around the squiggle (its bounding
box plus context, grown to the patch size, or larger and downscaled to it), exactly as at
inference; optionally enlarged by up to 15 % and shifted by up to 5 % of its side (augmentation).
Exclusion map: one pixel of each other gland in the patch, drawn from its inner half (distance to
its edge at least the mean), where a squiggle drawn in it would lie. Loss: as for nuclei
(:func:`nuclick_wsi.training.loss.nuclick_loss`), the other glands weighting the background.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from nuclick_wsi.guidance.squiggles import CONTEXT, square_box
from nuclick_wsi.model.weights import POSTPROCESS_DEFAULTS
from nuclick_wsi.io.datasets import Tile
from nuclick_wsi.training.loss import nuclick_loss
from nuclick_wsi.training import sampling as _sampling
from nuclick_wsi.training.sampling import color_augment

#: noise patterns kept for colour augmentation of patches of 256 px and more (the nucleus sampler keeps
#: 256 per shape: 800 MB at 512 x 512; 8 rolled at random are as good for augmentation)
NOISE_BANK_SIZE = 8


def gland_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``mask`` to the nearest pixel outside it (0 outside)."""
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].astype(np.float32)


def squiggle_threshold_range(dist: np.ndarray, mask: np.ndarray) -> float:
    """Upper end ``mu + sigma`` of the threshold range, from the distances inside the gland."""
    vals = dist[mask]
    return float(vals.mean() + vals.std()) if vals.size else 0.0


def sample_squiggle(mask: np.ndarray, rng: np.random.Generator, dist: np.ndarray | None = None,
                    tau: float | None = None) -> tuple[np.ndarray, float]:
    """Draw a training squiggle inside a gland.

    Parameters
    ----------
    mask : (H, W) bool
        The gland.
    rng : numpy Generator
    dist : (H, W) float, optional
        :func:`gland_distance` of ``mask`` (computed when not given).
    tau : float, optional
        A fixed threshold instead of a random one in ``[0, mu + sigma]``.

    Returns
    -------
    squiggle, tau
        The skeleton of ``{D > tau}`` (bool, same shape; never empty for a non-empty mask: when
        nothing lies above ``tau`` the deepest pixels are skeletonised) and the threshold used.
    """
    mask = np.asarray(mask, bool)
    if dist is None:
        dist = gland_distance(mask)
    if tau is None:
        tau = float(rng.uniform(0.0, squiggle_threshold_range(dist, mask)))
    region = (dist > tau) & mask
    if not region.any():
        region = mask & (dist >= dist[mask].max())
    return skeletonize(region), float(tau)


class GlandSampler:
    """Draws gland training samples (image, label, inclusion and exclusion maps) from tiles.

    Parameters
    ----------
    tiles : list of Tile
        Instance label images; every id is one gland (GlaS ``_anno.bmp`` layout).
    patch : int
        Network input side (512 for glands).
    context : float
        Context around the squiggle's box, as at inference.
    min_area : int
        Glands smaller than this (px) are never the target (cut-off fragments at image borders);
        they still count as other glands.
    exclusion_drop : float
        Chance of leaving out each exclusion pixel (robustness to unmarked neighbours).
    """

    def __init__(self, tiles: list[Tile], patch: int = 512, seed: int = 0, *, context: float = CONTEXT,
                 min_area: int = 200, exclusion_drop: float = 0.1) -> None:
        self.tiles, self.patch, self.context = tiles, int(patch), context
        self.exclusion_drop = exclusion_drop
        self.rng = np.random.default_rng(seed)
        self.index: list[tuple[int, int]] = []
        self._labels: list[np.ndarray] = []
        self._glands: list[dict[int, tuple]] = []
        for t, tile in enumerate(tiles):
            ids, inv = np.unique(tile.labels, return_inverse=True)
            compact = inv.reshape(tile.labels.shape).astype(np.int32)
            if ids[0] != 0:  # no background at all: ids start at 1
                compact += 1
            new_id = {int(i): k + (ids[0] != 0) for k, i in enumerate(ids)}
            targets = {new_id[int(i)] for i in tile.targets if int(i) in new_id and int(i) != 0}
            info = {}
            for gid, sl in enumerate(ndi.find_objects(compact), start=1):
                if sl is None:
                    continue
                m = compact[sl] == gid
                d = gland_distance(m)
                deep = m & (d >= d[m].mean())
                rr, cc = np.nonzero(deep)
                info[gid] = (sl, d, rr + sl[0].start, cc + sl[1].start)
                if gid in targets and int(m.sum()) >= min_area:
                    self.index.append((t, gid))
            self._labels.append(compact)
            self._glands.append(info)
        if not self.index:
            raise ValueError("no glands to train on in the tiles (all smaller than min_area?)")

    def __len__(self) -> int:
        return len(self.index)

    def draw(self, n: int, *, items: list[tuple[int, int]] | None = None, rng: np.random.Generator | None = None,
             jitter: bool = True):
        """Draw ``n`` samples (or ``items``): patch-sized arrays, before flips and colour augmentation.

        Returns ``img`` (n, P, P, 3) uint8, ``lab`` (n, P, P) int32, ``incl``, ``excl`` (n, P, P) bool,
        ``targets`` (n,) and ``boxes`` (n, 3): (ox, oy, side) in tile pixels.
        """
        rng = rng or self.rng
        p = self.patch
        if items is None:
            items = [self.index[k] for k in rng.integers(len(self.index), size=n)]
        n = len(items)
        imgs = np.empty((n, p, p, 3), np.uint8)
        labs = np.empty((n, p, p), np.int32)
        incl = np.zeros((n, p, p), bool)
        excl = np.zeros((n, p, p), bool)
        boxes = np.empty((n, 3), np.int64)
        for k, (t, gid) in enumerate(items):
            tile, labels = self.tiles[t], self._labels[t]
            sl, d, _, _ = self._glands[t][gid]
            skel, _ = sample_squiggle(d > 0, rng, d)
            sr, sc = np.nonzero(skel)
            sr, sc = sr + sl[0].start, sc + sl[1].start
            ox, oy, side = square_box(sc.min() + 0.5, sr.min() + 0.5, sc.max() + 0.5, sr.max() + 0.5, p,
                                      context=self.context)
            if jitter:
                cx, cy = ox + side / 2, oy + side / 2
                if rng.random() < 0.5:
                    side = int(math.ceil(side * rng.uniform(1.0, 1.15)))
                cx += rng.uniform(-0.05, 0.05) * side
                cy += rng.uniform(-0.05, 0.05) * side
                ox, oy = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
            boxes[k] = (ox, oy, side)
            img, lab = _crop(tile.image, labels, ox, oy, side)
            if side != p:
                img, lab = _resize(img, lab, p)
            imgs[k], labs[k] = img, lab
            f = p / side
            ir = np.floor((sr + 0.5 - oy) * f).astype(np.int64)
            ic = np.floor((sc + 0.5 - ox) * f).astype(np.int64)
            ok = (ir >= 0) & (ir < p) & (ic >= 0) & (ic < p)
            incl[k, ir[ok], ic[ok]] = True
            h, w = labels.shape
            window = labels[max(oy, 0):min(oy + side, h), max(ox, 0):min(ox + side, w)]
            for other in np.unique(window):
                if other == 0 or other == gid or rng.random() < self.exclusion_drop:
                    continue
                _, _, rr, cc = self._glands[t][int(other)]
                inside = np.flatnonzero((rr >= oy) & (rr < oy + side) & (cc >= ox) & (cc < ox + side))
                if not len(inside):
                    continue
                j = inside[rng.integers(len(inside))]
                r, c = int((rr[j] + 0.5 - oy) * f), int((cc[j] + 0.5 - ox) * f)
                if 0 <= r < p and 0 <= c < p and not incl[k, r, c]:
                    excl[k, r, c] = True
        targets = np.asarray([gid for _, gid in items], np.int64)
        return imgs, labs, incl, excl, targets, boxes


def _crop(image: np.ndarray, labels: np.ndarray, ox: int, oy: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = labels.shape
    img = np.full((side, side, 3), 255, np.uint8)
    lab = np.zeros((side, side), np.int32)
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + side, h), min(ox + side, w)
    if y1 > y0 and x1 > x0:
        img[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = image[y0:y1, x0:x1]
        lab[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = labels[y0:y1, x0:x1]
    return img, lab


def _resize(img: np.ndarray, lab: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Downscale a crop to p x p: image bilinear with antialiasing (Pillow), labels by nearest pixel centre."""
    from PIL import Image

    side = lab.shape[0]
    out = np.asarray(Image.fromarray(img).resize((p, p), Image.BILINEAR))
    idx = np.minimum(((np.arange(p) + 0.5) * side / p).astype(np.int64), side - 1)
    return out, lab[idx[:, None], idx[None, :]]


def make_gland_batch(sampler: GlandSampler, n: int, *, augment: bool = True, items=None,
                     rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch: inputs (n, 5, P, P), target masks and other-glands masks (n, 1, P, P).

    Augmentation: the 8 flips/quarter turns, the box jitter of :meth:`GlandSampler.draw` and the
    colour augmentation of the nucleus sampler (stain, brightness, contrast, saturation, blur/sharpen,
    noise).
    """
    rng = rng or sampler.rng
    imgs, labs, incl, excl, targets, _ = sampler.draw(n, items=items, rng=rng, jitter=augment)
    n = len(imgs)
    if augment:
        for k in range(n):
            rot, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            arrs = [imgs[k], labs[k], incl[k], excl[k]]
            arrs = [np.rot90(a, rot, axes=(0, 1)) for a in arrs]
            if flip:
                arrs = [a[:, ::-1] for a in arrs]
            imgs[k], labs[k], incl[k], excl[k] = arrs
    img = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)
    if augment:
        key = tuple(img.shape[1:])
        if key not in _sampling._NOISE_BANK and img[0].numel() * 256 * 4 > 64e6:  # patches >= 256 px
            gen = torch.Generator().manual_seed(1234)
            _sampling._NOISE_BANK[key] = torch.randn((NOISE_BANK_SIZE, *key), generator=gen)
        img = color_augment(img, rng)
    lab = torch.from_numpy(labs).unsqueeze(1)
    tgt = torch.from_numpy(targets).view(n, 1, 1, 1).to(lab.dtype)
    g = (lab == tgt).float()
    g_other = ((lab > 0) & (lab != tgt)).float()
    x = torch.cat([img, torch.from_numpy(incl).unsqueeze(1).float(), torch.from_numpy(excl).unsqueeze(1).float()], 1)
    return x, g, g_other


@torch.no_grad()
def validate_glands(net, sampler: GlandSampler, device, batch_size: int,
                    threshold: float = POSTPROCESS_DEFAULTS["gland"]["threshold"]) -> dict[str, float]:
    """Loss and mean IoU of the glands reconstructed from their squiggles (fixed draws, no augmentation).

    The prediction is thresholded and cut to the components the squiggle touches, as at inference.
    """
    net.eval()
    rng = np.random.default_rng(0)
    losses, ious = [], []
    items = sampler.index
    for s in range(0, len(items), batch_size):
        x, g, go = make_gland_batch(sampler, 0, augment=False, items=items[s:s + batch_size], rng=rng)
        xd = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(xd)
        losses.append(float(nuclick_loss(logits.float().cpu(), g, go)) * len(x))
        prob = torch.sigmoid(logits.float()).cpu().numpy()[:, 0]
        seeds = x[:, 3].numpy() > 0
        gt = g.numpy()[:, 0] > 0
        for k in range(len(prob)):
            fg = prob[k] >= threshold
            lab, _ = ndi.label(fg)
            keep = np.unique(lab[seeds[k] & fg])
            m = np.isin(lab, keep[keep > 0])
            union = (m | gt[k]).sum()
            ious.append((m & gt[k]).sum() / union if union else 1.0)
    net.train()
    return {"loss": float(np.sum(losses) / max(len(items), 1)), "iou": float(np.mean(ious))}
