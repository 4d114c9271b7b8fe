"""A U-Net that works at half resolution behind a space-to-depth stem, with a full-resolution head.

Most of a U-Net's cost on a 128x128 patch is in its full-resolution convolutions. Here the input
(RGB + inclusion + exclusion) is folded 2x2 into channels (``pixel_unshuffle``: 5 -> 20 channels at
64x64, nothing is lost), the encoder-decoder runs at 64, 32, 16 and 8 pixels, and the decoder's
64x64 output is unfolded back to 128x128 (``pixel_shuffle``) where a light head sees it next to a
few full-resolution features of the input, so boundaries are still placed to the pixel.

About a quarter of the light U-Net's FLOPs at the same widths; see ``benchmarks/precision.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nuclick_wsi.model.architectures.unet import LightUNet, conv_bn_relu


class S2DUNet(LightUNet):
    """Space-to-depth U-Net for NuClick guidance (5 channels in, 1 logit out).

    The encoder-decoder is :class:`LightUNet`'s (same blocks, same state-dict names) on the 2x2-folded
    input; only the stem and the head differ.

    Parameters
    ----------
    widths : sequence of int
        Channel widths of the half-resolution encoder levels; patch sides must be multiples of
        ``2 ** len(widths)``.
    in_channels : int
        5 for NuClick: RGB in [0, 1], inclusion map, exclusion map.
    fine : int
        Channels of the full-resolution features of the input used by the head.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), in_channels: int = 5, fine: int = 8) -> None:
        nn.Module.__init__(self)
        cin = self._build_body(widths, in_channels * 4)
        # back to full resolution: 4*fine channels at half resolution -> fine channels at full
        self.unfold = nn.Conv2d(cin, 4 * fine, 1)
        self.fine = conv_bn_relu(in_channels, fine)
        self.head = nn.Sequential(conv_bn_relu(2 * fine, fine), nn.Conv2d(fine, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.fine(x)
        h = F.pixel_shuffle(self.unfold(self.features(F.pixel_unshuffle(x, 2))), 2)
        return self.head(torch.cat([h, full], dim=1))
