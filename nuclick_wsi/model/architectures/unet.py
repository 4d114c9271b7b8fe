"""A light U-Net for NuClick guidance (5 channels in, 1 logit channel out).

Encoder widths are configurable (default 16-32-64-128, the size that meets the CPU speed target);
the bottleneck is a multi-scale block of parallel dilated 3x3 convolutions, the cheap part of the
NuClick network's idea (it runs at 1/8 of the patch size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU with a residual connection (1x1 projection when widths differ)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class MultiScaleBlock(nn.Module):
    """Parallel dilated convolutions (dilations 1, 2, 3, 6) fused by a 1x1 convolution."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch = max(cout // len(dilations), 8)
        self.branches = nn.ModuleList(conv_bn_relu(cin, branch, d) for d in dilations)
        self.fuse = nn.Sequential(
            nn.Conv2d(branch * len(dilations), cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([b(x) for b in self.branches], dim=1))


class LightUNet(nn.Module):
    """U-Net with residual blocks and a multi-scale bottleneck.

    Parameters
    ----------
    widths : sequence of int
        Channel widths of the encoder levels; the input is downsampled ``len(widths) - 1`` times,
        so patch sides must be multiples of ``2 ** (len(widths) - 1)``.
    in_channels : int
        5 for NuClick: RGB in [0, 1], inclusion map, exclusion map.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), in_channels: int = 5) -> None:
        super().__init__()
        self.head = nn.Conv2d(self._build_body(widths, in_channels), 1, 1)

    def _build_body(self, widths: Sequence[int], in_channels: int) -> int:
        """Encoders, bottleneck, up-convolutions and decoders; returns the last decoder's width."""
        widths = list(widths)
        self.widths = widths
        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.encoders.append(ResBlock(cin, w))
            cin = w
        self.bottleneck = nn.Sequential(ResBlock(cin, widths[-1]), MultiScaleBlock(widths[-1], widths[-1]))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        cin = widths[-1]
        for w in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.decoders.append(ResBlock(2 * w, w))
            cin = w
        return cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder's features, at the input's resolution."""
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
