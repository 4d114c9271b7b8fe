"""The network of MONAI's ``pathology_nuclick_annotation`` bundle, so that its ``model.pt`` loads.

The bundle (github.com/Project-MONAI/model-zoo, ``models/pathology_nuclick_annotation``, v0.2.1;
also what MONAI Label's pathology app offers as NuClick) trains MONAI's ``BasicUNet`` configured in
``configs/inference.json`` / ``configs/train.json`` as ``network_def``::

    BasicUNet(spatial_dims=2, in_channels=5, out_channels=1, features=[32, 64, 128, 256, 512, 32])

with BasicUNet's defaults (``monai/networks/nets/basic_unet.py``): LeakyReLU(0.1), instance norm
with affine parameters and no running statistics, convolution bias, no dropout, transposed
convolution upsampling. Layout (facts from MONAI's source; the code is ours):

* ``conv_0``: two conv units 5 -> 32 -> 32; a conv unit is ``conv`` (3x3, padding 1, bias) then
  ``adn`` = ``N`` (InstanceNorm2d, affine), ``D`` (dropout 0), ``A`` (LeakyReLU 0.1);
* ``down_1..down_4``: 2x2 max pooling, then ``convs`` (two conv units), widths 64, 128, 256, 512;
* ``upcat_4..upcat_2``: ``upsample.deconv`` (2x2 stride-2 transposed conv with bias, halving the
  width), replicate padding to the skip's size, concatenation ``[skip, upsampled]``, ``convs``
  (two conv units) to 256, 128, 64; ``upcat_1`` does not halve (64 -> 64) and ends at 32;
* ``final_conv``: 1x1 convolution with bias, 32 -> 1 logit.

Checkpoint: the bundle's ``CheckpointSaver`` (``configs/train.json``) has ``save_dict={"model":
network}``; ignite's ``Checkpoint.__call__`` (which it wraps) saves a single object's state dict
without its key, so the released ``models/model.pt`` (``large_files.yml``) is a bare state dict, and
``CheckpointLoader`` accepts it bare or under ``"model"``. Both load here.

Input convention (``configs/inference.json`` ``preprocessing``; ``monai/apps/nuclick/transforms.py``
``AddClickSignalsd``; ``monai/data/image_reader.py`` ``PILReader``): ``LoadImaged`` reads the PNG
with spatial axes swapped (x first: ``reverse_indexing=True``), ``ScaleIntensityRanged`` maps RGB
0..255 to **-1..1** (``metadata.json`` says [0, 1]; the transforms say otherwise and are what ran),
``AddClickSignalsd`` crops 128x128 (``bb_size=128``) around each click and adds an inclusion map
(1 at the click) and an exclusion map (1 at the other clicks), ``gaussian: false``. Output:
``sigmoid``, threshold 0.5 (``AsDiscreted``), then ``KeepLargestConnectedComponentd``. MONAI Label's
pathology app (github.com/Project-MONAI/MONAILabel, ``sample-apps/pathology/lib/configs/nuclick.py``
downloads this bundle; ``lib/infers/nuclick.py``) runs the same network and preprocessing on patches
it also reads x first (``lib/transforms.py`` ``LoadImagePatchd``: ``np.moveaxis(image, 0, 1)``),
keeps the 0.5 threshold and then applies ``PostFilterLabeld`` with its defaults (objects < 10 px and
holes < 30 px removed, ``monai/apps/nuclick/transforms.py``): being the interactive use, like ours,
those are the settings here. Resolution: trained on CoNSeP (``metadata.json`` ``data_source``), tiles
at 40x objective (Graham et al., HoVer-Net, Medical Image Analysis 2019), i.e. about 0.25 um/px.

Our batches are RGB in [0, 1] (y first) with the same guidance maps, so :class:`MonaiNuclickUNet`
rescales RGB to [-1, 1] and swaps the spatial axes around the network: same weights, same numbers
as in the bundle.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MONAI_NUCLICK_META", "MonaiNuclickUNet", "looks_monai_basicunet", "unwrap_monai"]

#: the bundle's ``network_def`` ``features``
FEATURES = (32, 64, 128, 256, 512, 32)

#: inference metadata for the bundle's weights (sources in the module docstring)
MONAI_NUCLICK_META: dict[str, Any] = {
    "task": "nuclei", "mpp": 0.25, "patch_size": 128,
    "postprocess": {"threshold": 0.5, "min_object_px": 10, "min_hole_px": 30},
    "input": "RGB scaled to [-1, 1], spatial axes swapped (x first), as the bundle's transforms",
    "source": "MONAI model-zoo pathology_nuclick_annotation BasicUNet state dict (Apache-2.0)",
}


def _conv_unit(cin: int, cout: int) -> nn.Sequential:
    adn = nn.Sequential(OrderedDict(N=nn.InstanceNorm2d(cout, affine=True), D=nn.Dropout(0.0),
                                    A=nn.LeakyReLU(0.1)))
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 3, padding=1), adn=adn))


def _two_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv_0=_conv_unit(cin, cout), conv_1=_conv_unit(cout, cout)))


class _UpCat(nn.Module):
    def __init__(self, cin: int, cat: int, cout: int, halves: bool = True) -> None:
        super().__init__()
        up = cin // 2 if halves else cin
        self.upsample = nn.Sequential(OrderedDict(deconv=nn.ConvTranspose2d(cin, up, 2, stride=2)))
        self.convs = _two_conv(cat + up, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [0, dx, 0, dy], mode="replicate")
        return self.convs(torch.cat([skip, x], dim=1))


class MonaiNuclickUNet(nn.Module):
    """The bundle's BasicUNet, taking our batch (RGB in [0, 1], y first) and returning logits.

    Parameters
    ----------
    in_channels, out_channels : int
        5 and 1 in the bundle.
    bundle_input : bool
        Convert our batch to the bundle's input convention (RGB in [-1, 1], x first) and the
        logits back; False runs the bare network (its ``forward_raw``).
    """

    def __init__(self, in_channels: int = 5, out_channels: int = 1, bundle_input: bool = True) -> None:
        super().__init__()
        f = FEATURES
        self.bundle_input = bool(bundle_input)
        self.conv_0 = _two_conv(in_channels, f[0])
        for i in range(1, 5):
            self.add_module(f"down_{i}", nn.Sequential(OrderedDict(max_pooling=nn.MaxPool2d(2),
                                                                   convs=_two_conv(f[i - 1], f[i]))))
        self.upcat_4 = _UpCat(f[4], f[3], f[3])
        self.upcat_3 = _UpCat(f[3], f[2], f[2])
        self.upcat_2 = _UpCat(f[2], f[1], f[1])
        self.upcat_1 = _UpCat(f[1], f[0], f[5], halves=False)
        self.final_conv = nn.Conv2d(f[5], out_channels, 1)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The network as MONAI runs it (input already in the bundle's convention)."""
        xs = [self.conv_0(x)]
        for i in range(1, 5):
            xs.append(getattr(self, f"down_{i}")(xs[-1]))
        u = xs.pop()
        for up in (self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1):
            u = up(u, xs.pop())
        return self.final_conv(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bundle_input:
            return self.forward_raw(x)
        x = torch.cat([x[:, :3] * 2.0 - 1.0, x[:, 3:]], dim=1).transpose(-1, -2)
        return self.forward_raw(x).transpose(-1, -2)


def unwrap_monai(ckpt: dict) -> dict:
    """The state dict inside a MONAI ``CheckpointSaver`` file (``{"model": state_dict}``), else ``ckpt``."""
    inner = ckpt.get("model")
    return inner if isinstance(inner, dict) and len(ckpt) == 1 else ckpt


def looks_monai_basicunet(sd: dict) -> bool:
    """True for a state dict with the keys of MONAI's ``BasicUNet`` (instance norm, deconv upsampling)."""
    return ("conv_0.conv_0.conv.weight" in sd and "final_conv.weight" in sd
            and "upcat_1.upsample.deconv.weight" in sd)
