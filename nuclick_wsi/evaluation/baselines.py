"""Click-seeded baselines: instance label images from clicks, without a network.

Both take clicks as pixel positions ``(x, y)`` (column, row; integers) and return an int32 label
image in which click ``k`` (0-based) owns label ``k + 1`` and 0 is background. They give a floor
for the NuClick models on the same clicks (README, "The model: train and evaluate").

If two clicks fall on the same pixel, the later one owns that pixel and the earlier one's label
is absent from the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

__all__ = ["disk_baseline", "watershed_baseline", "hematoxylin_foreground"]

ClickList = Sequence[tuple[int, int]] | np.ndarray


def _click_array(clicks: ClickList, shape: tuple[int, int]) -> np.ndarray:
    """Validate clicks against an image shape; return an ``(n, 2)`` int64 array of (x, y)."""
    arr = np.asarray(clicks, dtype=float).reshape(-1, 2) if len(clicks) else np.zeros((0, 2))
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError("clicks must be integer pixel positions (x, y)")
    arr = arr.astype(np.int64)
    h, w = shape
    bad = (arr[:, 0] < 0) | (arr[:, 0] >= w) | (arr[:, 1] < 0) | (arr[:, 1] >= h)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"click {k} at (x={arr[k, 0]}, y={arr[k, 1]}) lies outside the {w}x{h} image")
    return arr


def _seed_image(shape: tuple[int, int], clicks: np.ndarray) -> np.ndarray:
    """int32 image with ``k + 1`` at click ``k``'s pixel (later clicks win), 0 elsewhere."""
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[clicks[:, 1], clicks[:, 0]] = np.arange(1, len(clicks) + 1, dtype=np.int32)
    return seeds


def disk_baseline(
    shape: tuple[int, ...], clicks: ClickList, radius: float = 6
) -> np.ndarray:
    """A disk of ``radius`` px around every click.

    A pixel belongs to click ``k`` when its Euclidean distance to that click is at most ``radius``
    and no other click is nearer (exact ties are broken arbitrarily but deterministically).

    Parameters
    ----------
    shape : tuple of int
        Image shape; only the first two entries (rows, columns) are used, so ``rgb.shape`` works.
    clicks : sequence of (x, y)
        Integer pixel positions, column then row.
    radius : float, optional
        Disk radius in pixels (default 6).

    Returns
    -------
    numpy.ndarray
        int32 label image of shape ``shape[:2]``.
    """
    shape2 = (int(shape[0]), int(shape[1]))
    pts = _click_array(clicks, shape2)
    if len(pts) == 0:
        return np.zeros(shape2, dtype=np.int32)
    seeds = _seed_image(shape2, pts)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    labels[dist > radius] = 0
    return labels


def hematoxylin_foreground(rgb: np.ndarray, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin density and an Otsu foreground of it.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` (or RGBA) image, uint8 or floats in [0, 1].
    sigma : float, optional
        Gaussian smoothing of the hematoxylin channel before thresholding (0 = none).

    Returns
    -------
    hema : numpy.ndarray
        float64 ``(H, W)`` hematoxylin channel of :func:`skimage.color.rgb2hed` (larger = darker
        nuclear stain), smoothed.
    foreground : numpy.ndarray
        bool ``(H, W)``: ``hema`` above its Otsu threshold; all False on a uniform image.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hema = rgb2hed(rgb[..., :3])[..., 0]
    if sigma > 0:
        hema = ndimage.gaussian_filter(hema, sigma)
    if hema.size == 0 or np.ptp(hema) <= 1e-12:
        return hema, np.zeros(hema.shape, dtype=bool)
    return hema, hema > threshold_otsu(hema)


def _keep_click_components(labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Reduce every label to the 4-connected component that holds its seed pixel."""
    out = np.zeros_like(labels)
    boxes = ndimage.find_objects(labels)
    ys, xs = np.nonzero(seeds)
    for y, x in zip(ys, xs):
        lab = int(seeds[y, x])
        box = boxes[lab - 1] if lab <= len(boxes) else None
        if box is None:
            continue
        comp, _ = ndimage.label(labels[box] == lab)
        own = comp == comp[y - box[0].start, x - box[1].start]
        out[box][own] = lab
    return out


def watershed_baseline(
    rgb: np.ndarray,
    clicks: ClickList,
    sigma: float = 1.0,
    elevation: Literal["hematoxylin", "distance"] = "hematoxylin",
) -> np.ndarray:
    """Marker-controlled watershed of the hematoxylin stain, seeded at the clicks.

    Steps: hematoxylin channel (colour deconvolution, :func:`skimage.color.rgb2hed`) smoothed with
    a Gaussian of ``sigma``; foreground = above its Otsu threshold; one single-pixel marker per
    click; watershed (4-connectivity) restricted to the foreground plus the click pixels, flooding
    either the inverted hematoxylin (``elevation="hematoxylin"``, basins at the darkest stain) or
    the inverted distance transform of the foreground (``"distance"``). Every label is finally
    reduced to the connected component containing its click, so it always contains its click
    (a click on background yields a one-pixel object). Foreground with no click stays 0.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB image (RGBA accepted, alpha ignored).
    clicks : sequence of (x, y)
        Integer pixel positions, column then row.
    sigma : float, optional
        Smoothing of the hematoxylin channel, in pixels (default 1).
    elevation : {"hematoxylin", "distance"}, optional
        Surface flooded by the watershed (default ``"hematoxylin"``).

    Returns
    -------
    numpy.ndarray
        int32 label image of shape ``rgb.shape[:2]``; click ``k`` owns label ``k + 1``.
    """
    hema, fg = hematoxylin_foreground(rgb, sigma)
    pts = _click_array(clicks, hema.shape)
    if len(pts) == 0:
        return np.zeros(hema.shape, dtype=np.int32)
    seeds = _seed_image(hema.shape, pts)
    if elevation == "hematoxylin":
        surface = -hema
    elif elevation == "distance":
        surface = -ndimage.distance_transform_edt(fg)
    else:
        raise ValueError(f"elevation must be 'hematoxylin' or 'distance', not {elevation!r}")
    labels = watershed(surface, markers=seeds, mask=fg | (seeds > 0), connectivity=1)
    return _keep_click_components(labels.astype(np.int32), seeds)
