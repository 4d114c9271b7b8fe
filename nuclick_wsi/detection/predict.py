"""Running the detector on images: uint8 RGB batches -> heatmaps -> points."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from nuclick_wsi.detection.peaks import heatmap_peaks
from nuclick_wsi.model.architectures.detector import STRIDE

#: heatmap peaks closer than this (um) keep only the highest: nuclei are >= about 4 um across
MIN_DISTANCE_UM = 2.0


def side_multiple(net: torch.nn.Module) -> int:
    """Input sides the detector accepts are multiples of this."""
    return STRIDE * 2 ** (len(getattr(net, "widths", (0, 0, 0, 0))) - 1)


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float in [0, 1], channels-last, on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def heatmaps(net: torch.nn.Module, batch: np.ndarray, device: torch.device, dtype: torch.dtype | None) -> np.ndarray:
    """(n, h / 2, w / 2) float32 centre probabilities of a (n, h, w, 3) uint8 batch."""
    x = to_input(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = net(x)
    return torch.sigmoid(logits.float())[:, 0].cpu().numpy()


def resize_rgb(rgb: np.ndarray, factor: float) -> np.ndarray:
    """An RGB uint8 image scaled by ``factor`` (antialiased bilinear)."""
    if abs(factor - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(int(round(h * factor)), 1), max(int(round(w * factor)), 1))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def image_heatmap(net: torch.nn.Module, rgb: np.ndarray, device: torch.device, dtype: torch.dtype | None
                  ) -> np.ndarray:
    """The heatmap of a whole (small) image already at the detector's um/px, padded with white as needed."""
    m = side_multiple(net)
    h, w = rgb.shape[:2]
    ph, pw = -(-h // m) * m, -(-w // m) * m
    padded = np.full((ph, pw, 3), 255, np.uint8)
    padded[:h, :w] = rgb
    return heatmaps(net, padded[None], device, dtype)[0][: -(-h // STRIDE), : -(-w // STRIDE)]


def detect_image(net: torch.nn.Module, rgb: np.ndarray, *, image_mpp: float, model_mpp: float,
                 thresholds: tuple[float, ...], device: torch.device, dtype: torch.dtype | None = None
                 ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Points (image pixels) and scores at each threshold, for an image at ``image_mpp``."""
    factor = image_mpp / model_mpp
    prob = image_heatmap(net, resize_rgb(rgb, factor), device, dtype)
    min_d = max(int(round(MIN_DISTANCE_UM / (model_mpp * STRIDE))), 1)
    xy, score = heatmap_peaks(prob, min(thresholds), min_distance=min_d, stride=STRIDE)
    xy = xy / factor
    return {t: (xy[score >= t], score[score >= t]) for t in thresholds}
