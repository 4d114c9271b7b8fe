"""NuClick training samples made on the training device (a GPU when there is one).

The CPU sampler (training/sampling.py) cuts, rotates and guides each patch in NumPy: on a GPU that
loop, not the network, limits training to a few thousand samples per second. Here the tiles, their
labels, every admissible click and every object's centroid live on the device, and a batch is made
with a handful of tensor operations:

- a click is drawn uniformly among the pixels of the nucleus >= ``min_dist`` from its edge (the
  innermost pixels when it is thinner), as the CPU sampler draws it;
- the patch is sampled straight from the tile through the augmentation's affine map about the click
  (bilinear for the image, nearest for the labels; white and background outside the tile), so the
  click stays at the centre pixel exactly as at inference time;
- the exclusion map holds the other objects' centroids mapped through the same transform (each
  dropped with probability ``exclusion_drop``, as users do not click every nucleus);
- resolution and colour augmentation are the CPU sampler's own functions, drawn from a
  ``torch.Generator`` on the device.

Tiles can be packed into one ``.npz`` (:func:`pack_tiles`, images as lossless WebP) so a training
machine needs neither the annotation readers nor the original files.

Measured: on one H200 shared by seven training runs, each drew and trained about 1,400 samples/s
(batch 256, bf16). On a 2-core CPU this sampler is the slower one (220 ms against the NumPy sampler's
169 ms per augmented batch of 64 from 8 MoNuSeg tiles), so ``train --sampler auto`` keeps the NumPy
sampler on a CPU.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from nuclick_wsi.io.datasets import Tile
from nuclick_wsi.training.sampling import centroid_click, click_candidates, color_augment, resolution_augment

PACK_FORMAT = "nuclick-wsi-tiles/1"


def pack_tiles(tiles: list[Tile], path: str | Path) -> None:
    """Write ``tiles`` (image, labels, targets, centroids, name, source, um/px) to one compressed ``.npz``.

    ``Tile.valid`` is not kept: NuClick training does not use it.
    """
    from PIL import Image

    arrays: dict[str, np.ndarray] = {"format": np.array(PACK_FORMAT)}
    for k, t in enumerate(tiles):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(t.image)).save(buf, "WEBP", lossless=True, quality=100, method=4)
        ids = np.array(sorted(t.centroids), np.int64)
        arrays[f"image{k}"] = np.frombuffer(buf.getvalue(), np.uint8)
        arrays[f"labels{k}"] = t.labels.astype(np.int32)
        arrays[f"targets{k}"] = np.asarray(t.targets, np.int64)
        arrays[f"centroid_ids{k}"] = ids
        arrays[f"centroids{k}"] = np.array([t.centroids[int(i)] for i in ids], np.float64).reshape(-1, 2)
        arrays[f"name{k}"] = np.array(t.name)
        arrays[f"source{k}"] = np.array(t.source)
        arrays[f"mpp{k}"] = np.array(np.nan if t.mpp is None else t.mpp)
    np.savez_compressed(path, **arrays)


def load_packed(path: str | Path) -> list[Tile]:
    """The tiles :func:`pack_tiles` wrote (images decoded exactly: the WebP is lossless)."""
    with np.load(path) as z:
        if str(z["format"]) != PACK_FORMAT:
            raise ValueError(f"{path}: not a {PACK_FORMAT} file")
        tiles = []
        k = 0
        while f"image{k}" in z:
            image = _decode_webp(z[f"image{k}"])
            mpp = float(z[f"mpp{k}"])
            cents = {int(i): (float(x), float(y)) for i, (x, y) in zip(z[f"centroid_ids{k}"], z[f"centroids{k}"])}
            tiles.append(Tile(name=str(z[f"name{k}"]), image=image, labels=z[f"labels{k}"], targets=z[f"targets{k}"],
                              mpp=None if math.isnan(mpp) else mpp, source=str(z[f"source{k}"]), centroids=cents))
            k += 1
    return tiles


def _decode_webp(data: np.ndarray) -> np.ndarray:
    """RGB of a lossless WebP: Pillow, or OpenCV where this Pillow was built without WebP (same pixels)."""
    from PIL import Image, features

    if features.check("webp"):
        return np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
    import cv2

    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


class DevicePatchSampler:
    """Draws NuClick training batches on ``device`` (see the module docstring).

    ``batch(n)`` gives inputs (n, 5, P, P), the clicked object's mask and the other objects' mask
    (n, 1, P, P), like :func:`nuclick_wsi.training.sampling.make_batch`. ``len()`` counts the
    clickable objects; ``batch(items=...)`` takes object indices in ``range(len(self))``.
    """

    def __init__(self, tiles: list[Tile], patch: int = 128, seed: int = 0, exclusion_drop: float = 0.1,
                 device: str | torch.device = "cpu", min_dist: float = 2.0) -> None:
        if not tiles:
            raise ValueError("no tiles to sample")
        dev = torch.device(device)
        self.device, self.patch, self.exclusion_drop = dev, patch, exclusion_drop
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        hmax = max(t.labels.shape[0] for t in tiles)
        wmax = max(t.labels.shape[1] for t in tiles)
        n_t = len(tiles)
        images = np.full((n_t, hmax, wmax, 3), 255, np.uint8)
        labels = np.zeros((n_t, hmax, wmax), np.int32)
        kmax = max(1, max(len(t.centroids) for t in tiles))
        cent_xy = np.zeros((n_t, kmax, 2), np.float32)
        cent_id = np.full((n_t, kmax), -1, np.int64)
        obj_tile, obj_id, obj_start, obj_count, obj_centre, cand = [], [], [], [], [], []
        start = 0
        for k, t in enumerate(tiles):
            h, w = t.labels.shape
            images[k, :h, :w] = t.image[..., :3]
            labels[k, :h, :w] = t.labels
            ids = sorted(t.centroids)
            cent_id[k, :len(ids)] = ids
            cent_xy[k, :len(ids)] = [t.centroids[i] for i in ids]
            slices = ndi.find_objects(t.labels)
            for oid in np.asarray(t.targets, np.int64):
                sl = slices[oid - 1]
                if sl is None:
                    continue
                mask = t.labels[sl] == oid
                rr, cc = click_candidates(mask, min_dist)
                cand.append(np.stack([rr + sl[0].start, cc + sl[1].start], 1))
                r, c = centroid_click(mask)
                obj_tile.append(k)
                obj_id.append(int(oid))
                obj_start.append(start)
                obj_count.append(len(rr))
                obj_centre.append((r + sl[0].start, c + sl[1].start))
                start += len(rr)
        if not obj_id:
            raise ValueError("no clickable objects in the training tiles")
        self.images = torch.from_numpy(images).to(dev)
        self.labels = torch.from_numpy(labels).to(dev)
        self.shape = torch.tensor([t.labels.shape for t in tiles], dtype=torch.int64, device=dev)
        self.cent_xy = torch.from_numpy(cent_xy).to(dev)
        self.cent_id = torch.from_numpy(cent_id).to(dev)
        self.obj_tile = torch.tensor(obj_tile, dtype=torch.int64, device=dev)
        self.obj_id = torch.tensor(obj_id, dtype=torch.int64, device=dev)
        self.obj_start = torch.tensor(obj_start, dtype=torch.int64, device=dev)
        self.obj_count = torch.tensor(obj_count, dtype=torch.int64, device=dev)
        self.obj_centre = torch.tensor(obj_centre, dtype=torch.int64, device=dev)
        self.cand = torch.from_numpy(np.concatenate(cand).astype(np.int64)).to(dev)
        half = patch // 2
        ii, jj = torch.meshgrid(torch.arange(patch, device=dev), torch.arange(patch, device=dev), indexing="ij")
        self._offsets = torch.stack([(jj - half).reshape(-1), (ii - half).reshape(-1)], 0).float()  # (2, P*P): dx, dy

    def __len__(self) -> int:
        return len(self.obj_id)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=self.device)

    def _gather(self, t: torch.Tensor, y: torch.Tensor, x: torch.Tensor, table: torch.Tensor, fill) -> torch.Tensor:
        """``table[t, y, x]`` for each sample's pixels, ``fill`` outside the sample's tile."""
        h = self.shape[t, 0].view(-1, 1)
        w = self.shape[t, 1].view(-1, 1)
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        flat = (t.view(-1, 1) * table.shape[1] + y.clamp(0, table.shape[1] - 1)) * table.shape[2] \
            + x.clamp(0, table.shape[2] - 1)
        vals = table.reshape(-1, *table.shape[3:])[flat]
        if vals.ndim == 3:
            inside = inside.unsqueeze(-1)
        return torch.where(inside, vals, torch.as_tensor(fill, dtype=vals.dtype, device=vals.device))

    def batch(self, n: int = 0, *, augment: bool = True, click_at_centroid: bool = False,
              items: torch.Tensor | np.ndarray | list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of ``n`` random objects (or of ``items``): inputs, clicked mask, other objects' mask."""
        dev, p = self.device, self.patch
        if items is None:
            obj = torch.randint(len(self), (n,), generator=self.gen, device=dev)
        elif isinstance(items, torch.Tensor):  # np.asarray cannot read a CUDA tensor
            obj = items.to(dev, torch.int64)
        else:
            obj = torch.as_tensor(np.asarray(items), dtype=torch.int64, device=dev)
        n = len(obj)
        t, oid = self.obj_tile[obj], self.obj_id[obj]
        if click_at_centroid:
            click = self.obj_centre[obj]
        else:
            k = (self._rand(n) * self.obj_count[obj]).long().clamp_max(self.obj_count[obj] - 1)
            click = self.cand[self.obj_start[obj] + k]
        cy, cx = click[:, 0].float(), click[:, 1].float()
        if augment:
            angle = self._rand(n) * 2 * math.pi
            scale = torch.exp(math.log(0.8) + self._rand(n) * (math.log(1.25) - math.log(0.8)))
            flip = (self._rand(n) < 0.5).float() * -2 + 1
        else:
            angle, scale, flip = (torch.zeros(n, device=dev), torch.ones(n, device=dev), torch.ones(n, device=dev))
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        # tile position of output pixel offset (dx, dy) from the centre: click + A (dx, dy)
        a = torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1)  # (n, 2, 2)
        pos = a @ self._offsets  # (n, 2, P*P)
        x = cx.view(-1, 1) + pos[:, 0]
        y = cy.view(-1, 1) + pos[:, 1]
        x0, y0 = torch.floor(x), torch.floor(y)
        wx, wy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
        x0, y0 = x0.long(), y0.long()
        img = 0
        for dy, dx, wgt in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
            img = img + self._gather(t, y0 + dy, x0 + dx, self.images, 255).float() * wgt
        img = img.view(n, p, p, 3).permute(0, 3, 1, 2).div(255)
        lab = self._gather(t, torch.floor(y + 0.5).long(), torch.floor(x + 0.5).long(), self.labels, 0).view(n, 1, p, p)
        g = (lab == oid.view(-1, 1, 1, 1)).float()
        g_other = ((lab > 0) & (lab != oid.view(-1, 1, 1, 1))).float()
        incl = torch.zeros(n, 1, p, p, device=dev)
        incl[:, 0, p // 2, p // 2] = 1
        excl = self._exclusion(t, oid, cx, cy, a, drop=augment and not click_at_centroid)
        if augment:
            img = resolution_augment(img, self.gen)
            img = color_augment(img, self.gen)
        return torch.cat([img, incl, excl], 1), g, g_other

    def _exclusion(self, t, oid, cx, cy, a, *, drop: bool) -> torch.Tensor:
        """The other objects' centroids, through the inverse of the patch transform, as one-pixel marks."""
        n, p = len(t), self.patch
        rel = self.cent_xy[t] - torch.stack([cx, cy], 1).unsqueeze(1)  # (n, K, 2) x, y
        out = rel @ torch.linalg.inv(a).transpose(1, 2) + p // 2
        col = torch.floor(out[..., 0] + 0.5).long()
        row = torch.floor(out[..., 1] + 0.5).long()
        ids = self.cent_id[t]
        keep = (ids >= 0) & (ids != oid.view(-1, 1)) & (col >= 0) & (col < p) & (row >= 0) & (row < p)
        if drop and self.exclusion_drop:
            keep &= self._rand(*ids.shape) >= self.exclusion_drop
        excl = torch.zeros(n * p * p, device=self.device)
        k = torch.arange(n, device=self.device).view(-1, 1).expand_as(ids)
        excl[(k * p * p + row.clamp(0, p - 1) * p + col.clamp(0, p - 1))[keep]] = 1
        return excl.view(n, 1, p, p)
