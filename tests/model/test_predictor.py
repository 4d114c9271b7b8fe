"""The predictor: probabilities per patch, and test-time augmentation over flips."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nuclick_wsi.model.predictor import Predictor
from nuclick_wsi.model.weights import LoadedModel


class Ramp(nn.Module):
    """Not flip-equivariant: logit = 4 * (x - 0.5) of the first channel plus a left-to-right ramp."""

    def forward(self, x):
        w = x.shape[-1]
        ramp = torch.linspace(-2, 2, w).view(1, 1, 1, w)
        return 4 * (x[:, :1] - 0.5) + ramp


def ramp_model() -> LoadedModel:
    return LoadedModel(Ramp(), "ramp", {}, {"task": "nuclei", "mpp": 0.25, "patch_size": 16})


def test_tta_is_the_mean_over_the_four_flips():
    x = np.random.default_rng(0).random((3, 5, 16, 16), dtype=np.float32)
    plain = Predictor(ramp_model(), "cpu", "fp32")
    tta = Predictor(ramp_model(), "cpu", "fp32", tta=True)
    expect = np.zeros((3, 16, 16), np.float32)
    for flip in (lambda a: a, lambda a: a[..., ::-1], lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, ::-1]):
        expect += flip(plain(np.ascontiguousarray(flip(x))))  # a flip is its own inverse
    np.testing.assert_allclose(tta(x), expect / 4, atol=1e-6)
    assert not np.allclose(tta(x), plain(x), atol=1e-3)
    assert "tta x4" in tta.description and "tta" not in plain.description


def test_tta_leaves_a_flip_equivariant_network_unchanged():
    class Pixelwise(nn.Module):
        def forward(self, x):
            return 3 * x[:, :1] - x[:, 3:4]

    model = LoadedModel(Pixelwise(), "pixelwise", {}, {"task": "nuclei", "mpp": 0.25, "patch_size": 16})
    x = np.random.default_rng(1).random((2, 5, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(Predictor(model, "cpu", "fp32", tta=True)(x), Predictor(model, "cpu", "fp32")(x),
                               atol=1e-6)
