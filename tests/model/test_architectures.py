"""Checkpoint compatibility of :class:`NuClickNet` with TIAToolbox's ``NuClick``.

``tests/data/tiatoolbox_nuclick_keys.json`` lists every state-dict key and shape of
TIAToolbox's ``NuClick(num_input_channels=5, num_output_channels=1)``, derived
independently from reading ``tiatoolbox/models/architecture/nuclick.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.helpers import DATA, random_state_dict
from nuclick_wsi.model.architectures.nuclick import BN_EPS, TIATOOLBOX_NUCLICK_DEFAULTS, NuClickNet

KEYS_JSON = DATA / "tiatoolbox_nuclick_keys.json"


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[int, ...]]:
    """Key -> shape of TIAToolbox's network."""
    data = json.loads(KEYS_JSON.read_text())
    keys = {k: tuple(v) for k, v in data["keys"].items()}
    assert len(keys) == data["num_keys"] == 360
    return keys


@pytest.fixture(scope="module")
def net() -> NuClickNet:
    torch.manual_seed(0)
    return NuClickNet()


def _fake_tiatoolbox_checkpoint(reference: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Random tensors with TIAToolbox's keys, as ``torch.save(model.state_dict())`` gives."""
    return random_state_dict(reference, 1, batches_tracked=12345)


def test_state_dict_keys_and_shapes_match_tiatoolbox(
    net: NuClickNet, reference: dict[str, tuple[int, ...]]
) -> None:
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(ours) == 360
    assert set(ours) - set(reference) == set(), "keys TIAToolbox does not have"
    assert set(reference) - set(ours) == set(), "TIAToolbox keys we lack"
    mismatched = {k: (ours[k], reference[k]) for k in ours if ours[k] != reference[k]}
    assert mismatched == {}
    # Spot checks of the documented key names.
    for key in (
        "conv_block_1.0.conv_bn_relu.0.weight",
        "residual_block_1.0.conv_block_1.conv_bn_relu.1.running_mean",
        "multiscale_block_1.conv_block_4.conv_bn_relu.0.weight",
        "conv_transpose_1.weight",
        "conv_block_3.conv_bn_relu.0.bias",
    ):
        assert key in ours


def test_loads_tiatoolbox_style_checkpoint_strict(reference: dict[str, tuple[int, ...]]) -> None:
    sd = _fake_tiatoolbox_checkpoint(reference)
    fresh = NuClickNet()
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = fresh.state_dict()
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    # The convenience constructor also accepts a DataParallel-prefixed copy.
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    again = NuClickNet.from_state_dict(wrapped)
    assert not again.training
    assert torch.equal(
        again.state_dict()["conv_transpose_1.weight"], sd["conv_transpose_1.weight"]
    )


def test_forward_shape_and_logits(net: NuClickNet) -> None:
    torch.set_num_threads(1)
    net.eval()
    x = torch.rand(1, 5, 128, 128)
    x[:, 3:] = 0
    x[:, 3, 64, 64] = 1
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (1, 1, 128, 128)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # Logits, not probabilities: a randomly initialised net leaves [0, 1].
    assert (y < 0).any() or (y > 1).any()


def test_parameter_count(net: NuClickNet) -> None:
    n = sum(p.numel() for p in net.parameters())
    assert n == json.loads(KEYS_JSON.read_text())["num_parameters"] == 66_800_321
    assert abs(n / 1e6 - 66.8) < 0.05


def test_batchnorm_eps_and_bias_rules(net: NuClickNet) -> None:
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == BN_EPS == 1.001e-5 for m in bns)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    with_bias = sorted(name for name, m in convs.items() if m.bias is not None)
    assert with_bias == ["conv_block_3.conv_bn_relu.0"]
    assert convs["conv_block_3.conv_bn_relu.0"].kernel_size == (1, 1)
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 5 and all(m.bias is not None for m in ups)


def test_defaults_constant() -> None:
    d = TIATOOLBOX_NUCLICK_DEFAULTS
    assert d["num_input_channels"] == 5 and d["patch_size"] == (128, 128)
    assert d["postproc"]["thresh"] == 0.33
