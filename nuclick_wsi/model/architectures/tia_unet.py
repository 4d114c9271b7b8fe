"""The layout of TIAToolbox's ``nuclick_light-pannuke`` network, so that its weights load here.

TIAToolbox publishes a light NuClick as ``unet.UNetModel(num_input_channels=5, num_output_channels=1,
encoder="unet", encoder_levels=[32, 64, 128, 256], decoder_block=[3, 3], skip_type="add")``. Its layout
cannot be poured into our :class:`~nuclick_wsi.model.architectures.unet.LightUNet` (average pooling instead of max
pooling, nearest-neighbour upsampling instead of transposed convolutions, skips added instead of
concatenated, no residual or multi-scale blocks), so this module rebuilds it with the same state-dict
keys (facts read from ``tiatoolbox/models/architecture/unet.py``; the code is ours):

* encoder level ``i`` (``backbone.blocks.i.0``): conv3x3 (no bias), BN, ReLU, conv3x3 (no bias), BN,
  ReLU; its output is kept as the skip, then 2x2 average pooling;
* ``conv1x1`` maps the deepest features (256) to the next width (128), no bias;
* decoder step ``j`` (``uplist.j``): nearest 2x upsampling (``upsample2x``, whose 2x2 ``unpool_mat``
  buffer is part of the state dict), add the encoder features of that size, then conv3x3-BN-ReLU twice
  (widths 128 -> 64, 64 -> 32, 32 -> 32);
* ``clf``: 1x1 convolution with bias to 1 logit channel.

TIAToolbox's ``forward`` divides its whole 5-channel input by 255, so its users feed RGB in 0..255 and
guidance maps of 255 at the clicks (the TIA Centre's own Cytomine NuClick app does). Our batches are
RGB in [0, 1] with guidance maps of 1, i.e. the same tensor after that division, so this network skips
it: same weights, same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TIA_LIGHT_ARGS", "TiaLightUNet", "looks_tia_light"]

#: The arguments of TIAToolbox's ``nuclick_light-pannuke`` entry in ``pretrained_model.yaml``.
TIA_LIGHT_ARGS = {"widths": (32, 64, 128, 256), "in_channels": 5, "out_channels": 1}


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """conv3x3-BN-ReLU twice; indices 0, 1, 3, 4 hold the parameters (as in TIAToolbox)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class _Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling; keeps TIAToolbox's ``unpool_mat`` buffer for strict loading."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class TiaLightUNet(nn.Module):
    """TIAToolbox's light NuClick U-Net (``nuclick_light-pannuke``), taking inputs in [0, 1].

    Parameters
    ----------
    widths : sequence of int
        Encoder widths (TIAToolbox's ``encoder_levels``); the patch side must be a multiple of
        ``2 ** (len(widths) - 1)``.
    in_channels, out_channels : int
        5 (RGB in [0, 1], inclusion, exclusion) and 1 (a logit).
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), in_channels: int = 5,
                 out_channels: int = 1) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("TiaLightUNet needs at least two encoder widths")
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.backbone.blocks.append(nn.ModuleList([_double_conv(cin, w), nn.AvgPool2d(2, stride=2)]))
            cin = w
        deep_first = widths[::-1]
        self.conv1x1 = nn.Conv2d(deep_first[0], deep_first[1], 1, bias=False)
        self.uplist = nn.ModuleList()
        for k, ch in enumerate(deep_first[1:]):
            nxt = deep_first[k + 2] if k + 2 < len(deep_first) else ch
            self.uplist.append(_double_conv(ch, nxt))
        self.clf = nn.Conv2d(deep_first[-1], out_channels, 1, bias=True)
        self.upsample2x = _Upsample2x()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv, pool in self.backbone.blocks:
            x = conv(x)
            skips.append(x)
            x = pool(x)
        x = self.conv1x1(skips[-1])
        for up, skip in zip(self.uplist, reversed(skips[:-1])):
            x = up(self.upsample2x(x) + skip)
        return self.clf(x)


def looks_tia_light(state_dict: dict) -> bool:
    """True for a state dict with the keys of TIAToolbox's ``UNetModel`` with a "unet" encoder."""
    return ("conv1x1.weight" in state_dict and "clf.weight" in state_dict
            and any(k.startswith("backbone.blocks.0.0.0.") for k in state_dict))
