"""Shared test fixtures: a model that draws a known disk, generated slides, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nuclick_wsi.models.weights import LoadedModel

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():  # CI clones the repo with ../shared beside it; allow an override
    SHARED = Path(os.environ.get("NUCLICK_SHARED_DATA", SHARED))


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
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        d = torch.sqrt((yy - h // 2) ** 2 + (xx - w // 2) ** 2)
        logit = 2.0 * (self.radius - d) + self.dummy
        return logit.expand(n, 1, h, w).clone()


def disk_model(radius: float = 6.0, mpp: float = 0.25, **post) -> LoadedModel:
    """A LoadedModel around :class:`DiskNet` (threshold 0.5 -> pixels within ``radius`` of the click)."""
    meta = {"mpp": mpp, "patch_size": 128, "task": "nuclei",
            "postprocess": {"threshold": 0.5, "min_object_px": 1, "min_hole_px": 0, **post}}
    return LoadedModel(net=DiskNet(radius).eval(), arch="test-disk", arch_args={}, metadata=meta, source="test:disk")


@pytest.fixture
def disk():
    return disk_model


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


@pytest.fixture
def tiff_slide(tmp_path):
    def make(width=1024, height=768, mpp=0.25, name="slide.tif", **kw):
        return write_tiff_slide(tmp_path / name, width, height, mpp, **kw)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data folder {SHARED} not found")
    return SHARED
