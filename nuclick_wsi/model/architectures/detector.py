"""The proposal detector: a space-to-depth U-Net that regresses a nucleus-centre heatmap.

The RGB input (at the detector's um/px, 0.5 by default) is folded 2x2 into channels
(``pixel_unshuffle``: 3 -> 12 channels, nothing lost), :class:`LightUNet`'s encoder-decoder runs on
it, and a 1x1 head gives one logit per folded pixel: the heatmap is at half the input's resolution
(1 um/px for a 0.5 um/px input, still several pixels per nucleus). Its peaks are the proposals
(``nuclick_wsi/detection/peaks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nuclick_wsi.model.architectures.unet import LightUNet

#: the heatmap's pixel is this many input pixels
STRIDE = 2


class S2DDetector(LightUNet):
    """Centre-heatmap detector (3 channels in, 1 logit out at 1/2 resolution).

    Parameters
    ----------
    widths : sequence of int
        Encoder widths at 1/2, 1/4, ... of the input; sides must be multiples of ``2 ** len(widths)``.
    in_channels : int
        3: RGB in [0, 1].
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), in_channels: int = 3) -> None:
        nn.Module.__init__(self)
        cin = self._build_body(widths, in_channels * STRIDE * STRIDE)
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(F.pixel_unshuffle(x, STRIDE)))
