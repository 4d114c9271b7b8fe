"""The UNet of the NuClick authors' PyTorch port (github.com/mostafajahanifar/nuclick_torch).

The port ships two pretrained networks (its README.md, "Using pretrained NuClick"):

* ``NuClick_NN`` ("NuClick architecture", ``NuClick_Nuclick_40xAll.pth``): its state dict has
  exactly the keys and shapes of TIAToolbox's ``NuClick`` (TIAToolbox took its network from this
  port), so it loads as our ``nuclick`` architecture (:mod:`nuclick_wsi.model.architectures.nuclick`). The file
  alone cannot say which of the two it came from; it gets TIAToolbox's settings, which differ from
  the port's only in the threshold (0.33 there, 0.5 here: pass ``--threshold 0.5``).
* ``UNet`` ("UNet architecture", an improved U-Net): built by ``train.py``/``predict.py`` as
  ``UNet(n_channels=5, n_classes=1, bilinear=True)``; that layout is rebuilt here.

Facts read from the port (commit 4be7978, ``models/architecture.py`` and ``models/layers.py``);
the code is ours:

* ``inc``: double convolution 5 -> 64 (conv3x3 with bias, BatchNorm, ReLU, twice: parameters at
  ``double_conv.{0,1,3,4}``, BatchNorm eps 1e-5);
* ``down1..down4``: 2x2 max pooling then a double convolution (``maxpool_conv.1.double_conv``),
  widths 128, 256, 512, 512 (1024 halved because of bilinear upsampling);
* ``up1..up4``: bilinear 2x upsampling (``align_corners=True``, no parameters), zero padding to
  the skip's size, concatenation ``[skip, upsampled]``, then a double convolution whose middle width
  is half its input (``up{i}.conv.double_conv``): 1024 -> 512 -> 256, 512 -> 256 -> 128,
  256 -> 128 -> 64, 128 -> 64 -> 64;
* ``outc.conv``: 1x1 convolution with bias, 64 -> 1 logit.

Checkpoints: ``train.py`` saves ``torch.save(net.state_dict(), ...)``, a bare state dict, and
``predict.py`` loads it with ``net.load_state_dict(torch.load(path))``.

Inference conventions (``predict.py``, ``utils/misc.py``, ``utils/guiding_signals.py``,
``utils/process.py``, ``config.py``): 128x128 patches centred on the click
(``config.Config.patch_size``), RGB (PIL) divided by 255, channels ``[R, G, B, inclusion,
exclusion]`` with a single 1 at this click / at the other clicks -- exactly our batch, so no
adapter is needed; ``sigmoid`` of the logit thresholded at 0.5 (``--mask-threshold`` default
``Config.mask_thresh=0.5``), objects < 10 px and holes < 30 px removed, reconstruction from the
click. Resolution: the released weights are named ``..._40xAll`` (40x, about 0.25 um/px); the port
states no resolution for the UNet, which is trained with the same patch pipeline, so 0.25 um/px
is assumed for it too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NUCLICK_TORCH_UNET_META", "NuclickTorchUNet", "looks_nuclick_torch_unet"]

#: inference metadata for the port's UNet (sources in the module docstring)
NUCLICK_TORCH_UNET_META: dict[str, Any] = {
    "task": "nuclei", "mpp": 0.25, "patch_size": 128,
    "postprocess": {"threshold": 0.5, "min_object_px": 10, "min_hole_px": 30},
    "source": "nuclick_torch UNet state dict (github.com/mostafajahanifar/nuclick_torch, CC BY-NC-SA 4.0)",
}


def _double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    mid = mid or cout
    return nn.Sequential(
        nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def _named(**children: nn.Module) -> nn.Sequential:
    """A sequence with named children, so that keys read e.g. ``inc.double_conv.0.weight``."""
    return nn.Sequential(OrderedDict(children))


class NuclickTorchUNet(nn.Module):
    """nuclick_torch's ``UNet(n_channels=5, n_classes=1, bilinear=True)``, taking our 5-channel batch."""

    def __init__(self, in_channels: int = 5, out_channels: int = 1) -> None:
        super().__init__()
        self.inc = _named(double_conv=_double_conv(in_channels, 64))
        for i, (cin, cout) in enumerate([(64, 128), (128, 256), (256, 512), (512, 512)], start=1):
            down = _named(maxpool_conv=nn.Sequential(nn.MaxPool2d(2), _named(double_conv=_double_conv(cin, cout))))
            self.add_module(f"down{i}", down)
        for i, (cin, cout) in enumerate([(1024, 256), (512, 128), (256, 64), (128, 64)], start=1):
            self.add_module(f"up{i}", _named(conv=_named(double_conv=_double_conv(cin, cout, cin // 2))))
        self.outc = _named(conv=nn.Conv2d(64, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for i in range(1, 5):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        x = skips.pop()
        for i in range(1, 5):
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = getattr(self, f"up{i}")(torch.cat([skip, x], dim=1))
        return self.outc(x)


def looks_nuclick_torch_unet(sd: dict) -> bool:
    """True for a state dict with the keys of nuclick_torch's ``UNet``."""
    return ("inc.double_conv.0.weight" in sd and "outc.conv.weight" in sd
            and "down4.maxpool_conv.1.double_conv.0.weight" in sd)
