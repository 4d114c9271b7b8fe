"""Full NuClick network (Koohbanani et al., Medical Image Analysis 2020).

The module layout (attribute names, nesting, layer order) is chosen so that
``NuClickNet().state_dict()`` has exactly the key names and tensor shapes of
TIAToolbox's ``NuClick`` architecture (``tiatoolbox/models/architecture/nuclick.py``).
TIAToolbox's published checkpoint ``nuclick_original-pannuke.pth`` therefore loads
with ``load_state_dict(sd, strict=True)`` without renaming anything.

Layout in brief (widths are output channels)::

    encoder                      decoder
    stem 64-32-32 (7/5/3)  ----------------------------------> cat -> head 64-32-32 -> 1x1
      pool                                                      ^ up 64->32
    res 64, res 64         --------------------------> cat -> res 64, MS(4x16), res 64
      pool                                              ^ up 128->64
    res 128, MS(4x32), res 128 ----------------> cat -> res 128, res 128
      pool                                      ^ up 256->128
    res 256 x3             ------------> cat -> res 256, MS(4x64), res 256
      pool                              ^ up 256->256
    res 512 x3             ---> cat -> res 512, res 256
      pool                       ^ up 1024->512
    res 1024 x2 (bottleneck) ----+

"res" is a two-convolution residual unit (conv-BN, conv-BN, add, ReLU); "MS" is a
multi-scale unit of four parallel dilated conv-BN-ReLU branches concatenated along
channels. All 3x3/5x5/7x7 convolutions have no bias and keep the spatial size;
BatchNorm uses ``eps=1.001e-5`` (the Keras default of the original implementation).
The network has five 2x2 max-poolings, so H and W must be multiples of 32 for the
skip connections to line up exactly (128, 256 and 512 all are); ``forward`` zero-pads
other sizes to the next multiple of 32 and crops the logits back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "BN_EPS",
    "TIATOOLBOX_NUCLICK_DEFAULTS",
    "NuClickNet",
]

#: BatchNorm epsilon used throughout (Keras default, kept by the TIAToolbox port).
BN_EPS: float = 1.001e-5

# Facts about how TIAToolbox feeds and post-processes its ``nuclick_original-pannuke``
# weights. Sources (TissueImageAnalytics/tiatoolbox):
#   * tiatoolbox/data/pretrained_model.yaml, entry ``nuclick_original-pannuke``:
#     architecture ``nuclick.NuClick(num_input_channels=5, num_output_channels=1)``;
#     ioconfig input/output resolution ``{'units': 'baseline', 'resolution': 0.25}``
#     (note: *baseline* units, i.e. a 0.25 scale factor of level 0, not 0.25 mpp),
#     patch_input_shape = patch_output_shape = [128, 128].
#   * tests/models/test_nuclick.py: a 128x128 RGB patch read with ``imread`` (RGB
#     order) is converted with ``np.float32(patch) / 255.0``, moved to CHW, and
#     concatenated as [R, G, B, inclusion, exclusion]; inclusion = single 1 at the
#     click (patch centre, (64, 64)); exclusion = single 1 at each other click.
#     Output is compared after ``postproc(..., do_reconstruction=True)``.
#   * tiatoolbox/models/architecture/nuclick.py: ``infer_batch`` casts to float32,
#     applies ``torch.sigmoid`` to the network output (the network returns logits)
#     and squeezes the channel axis; ``postproc`` defaults are thresh=0.33,
#     min_size=10 (remove_small_objects), min_hole_size=30 (remove_small_holes),
#     do_reconstruction=False (when True: skimage ``reconstruction`` with the click
#     map as marker and the thresholded mask as mask, footprint disk(1); skipped
#     with a warning when the click falls outside the mask).
#   * tiatoolbox/visualization/bokeh_app/main.py (interactive NuClick in the viewer)
#     reads 128x128 patches at ``{"resolution": 0.25, "units": "mpp"}`` (40x); an
#     earlier interactive-segmentor engine used thresh=0.5, min size 10, min hole 30
#     with reconstruction on.
TIATOOLBOX_NUCLICK_DEFAULTS: dict[str, Any] = {
    "weights_name": "nuclick_original-pannuke",
    "num_input_channels": 5,
    "num_output_channels": 1,
    "channel_order": ("R", "G", "B", "inclusion", "exclusion"),
    "rgb_scale": 1.0 / 255.0,  # uint8 RGB -> float32 in [0, 1]; no mean/std normalisation
    "layout": "NCHW",
    "dtype": "float32",
    "output": "logits",  # sigmoid applied outside the network (infer_batch)
    "patch_size": (128, 128),
    "click_position": (64, 64),  # (row, col) of the inclusion click in the tests
    "config_resolution": {"units": "baseline", "resolution": 0.25},
    "viewer_resolution": {"units": "mpp", "resolution": 0.25},
    "postproc": {
        "thresh": 0.33,
        "min_size": 10,
        "min_hole_size": 30,
        "do_reconstruction": False,
        "reconstruction_footprint": "disk(1)",
    },
    "interactive_postproc": {
        "thresh": 0.5,
        "min_size": 10,
        "min_hole_size": 30,
        "do_reconstruction": True,
    },
}


def _same_padding(kernel_size: int, dilation: int) -> int:
    """Zero padding that keeps the spatial size for an odd kernel at stride 1.

    Parameters
    ----------
    kernel_size : int
        Odd square kernel size.
    dilation : int
        Dilation rate.

    Returns
    -------
    int
        Padding on each side.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    return dilation * (kernel_size - 1) // 2


class ConvUnit(nn.Module):
    """Convolution, optional BatchNorm, optional ReLU, kept in ``self.conv_bn_relu``.

    The single child ``conv_bn_relu`` is an ``nn.Sequential`` whose index 0 is the
    convolution and index 1 the BatchNorm (when present), which yields the key names
    ``conv_bn_relu.0.weight`` and ``conv_bn_relu.1.running_mean`` etc.

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels.
    kernel_size : int, optional
        Square, odd kernel size. Default 3.
    dilation : int, optional
        Dilation rate; padding keeps the spatial size. Default 1.
    batchnorm : bool, optional
        Append ``BatchNorm2d(eps=BN_EPS)``. Default True.
    relu : bool, optional
        Append a ReLU. Default True.
    bias : bool, optional
        Give the convolution a bias. Default False.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        *,
        batchnorm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=1,
            padding=_same_padding(kernel_size, dilation),
            dilation=dilation,
            bias=bias,
        )
        nn.init.xavier_uniform_(conv.weight)
        layers: list[nn.Module] = [conv]
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels, eps=BN_EPS))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        self.conv_bn_relu = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C_in x H x W``.

        Returns
        -------
        torch.Tensor
            ``N x C_out x H x W``.
        """
        return self.conv_bn_relu(x)


class ResidualUnit(nn.Module):
    """Two 3x3 conv-BN layers whose outputs are summed, then a ReLU.

    ``y = relu(a + b)`` with ``a = bn(conv(x))`` and ``b = bn(conv(a))``; the shortcut
    starts after the first convolution, so input and output widths may differ.

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_block_1 = ConvUnit(in_channels, out_channels, 3, relu=False)
        self.conv_block_2 = ConvUnit(out_channels, out_channels, 3, relu=False)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual unit.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C_in x H x W``.

        Returns
        -------
        torch.Tensor
            ``N x C_out x H x W``.
        """
        a = self.conv_block_1(x)
        return self.activation(a + self.conv_block_2(a))


class MultiScaleUnit(nn.Module):
    """Four parallel conv-BN-ReLU branches with different kernels and dilations.

    The branch outputs are concatenated along the channel axis, so the output has
    ``4 * branch_channels`` channels.

    Parameters
    ----------
    in_channels : int
        Number of input channels (shared by all branches).
    branch_channels : int
        Output channels of each branch.
    kernel_sizes : Sequence[int]
        Four odd kernel sizes, one per branch.
    dilations : Sequence[int]
        Four dilation rates, one per branch.
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        kernel_sizes: Sequence[int],
        dilations: Sequence[int],
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != 4 or len(dilations) != 4:
            raise ValueError("MultiScaleUnit needs exactly four kernel sizes and dilations")
        # Attribute names conv_block_1..conv_block_4 are part of the checkpoint format.
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations), start=1):
            setattr(self, f"conv_block_{i}", ConvUnit(in_channels, branch_channels, k, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the four branches on ``x`` and concatenate them.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C_in x H x W``.

        Returns
        -------
        torch.Tensor
            ``N x (4 * branch_channels) x H x W``.
        """
        return torch.cat(
            [self.conv_block_1(x), self.conv_block_2(x), self.conv_block_3(x), self.conv_block_4(x)],
            dim=1,
        )


def _residual_stack(widths: Sequence[int]) -> nn.Module:
    """Build consecutive residual units; a single unit is returned unwrapped.

    Parameters
    ----------
    widths : Sequence[int]
        ``[c_in, c_1, ..., c_n]``: unit ``i`` maps ``widths[i]`` to ``widths[i + 1]``.

    Returns
    -------
    torch.nn.Module
        A bare :class:`ResidualUnit` when ``n == 1`` (keys ``<name>.conv_block_1...``),
        otherwise an ``nn.Sequential`` of them (keys ``<name>.<i>.conv_block_1...``).
    """
    units = [ResidualUnit(a, b) for a, b in zip(widths[:-1], widths[1:])]
    return units[0] if len(units) == 1 else nn.Sequential(*units)


def _upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """2x2 stride-2 transposed convolution (with bias) doubling H and W.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels.

    Returns
    -------
    torch.nn.ConvTranspose2d
        The upsampling layer.
    """
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)


class NuClickNet(nn.Module):
    """The full NuClick encoder-decoder, checkpoint-compatible with TIAToolbox.

    Input is ``N x 5 x H x W``: RGB scaled to [0, 1], the inclusion map (the click)
    and the exclusion map (other clicks). Output is ``N x 1 x H x W`` *logits*; apply
    ``torch.sigmoid`` to get probabilities. The five 2x2 poolings need H and W to be
    multiples of 32; other sizes are zero-padded internally and cropped back.
    NuClick uses 128 (nuclei), 256 (cells) or 512 (glands).

    About 66.8M parameters, ~19 GFLOP per 128x128 patch.

    Parameters
    ----------
    in_channels : int, optional
        Input channels. Default 5 (TIAToolbox weights need 5).
    out_channels : int, optional
        Output channels. Default 1 (TIAToolbox weights need 1).

    Examples
    --------
    >>> net = NuClickNet()
    >>> sd = torch.load("nuclick_original-pannuke.pth", map_location="cpu")  # doctest: +SKIP
    >>> net.load_state_dict(sd, strict=True)  # doctest: +SKIP
    """

    #: Spatial size must be divisible by this (five 2x2 max-poolings).
    size_multiple: int = 32

    def __init__(self, in_channels: int = 5, out_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

        # Stem and head: three conv-BN-ReLU layers each.
        self.conv_block_1 = nn.Sequential(
            ConvUnit(in_channels, 64, 7), ConvUnit(64, 32, 5), ConvUnit(32, 32, 3)
        )
        self.conv_block_2 = nn.Sequential(
            ConvUnit(64, 64, 3), ConvUnit(64, 32, 3), ConvUnit(32, 32, 3)
        )
        # Final 1x1 projection to logits: the only convolution with a bias.
        self.conv_block_3 = ConvUnit(32, out_channels, 1, batchnorm=False, relu=False, bias=True)

        # Encoder residual stages.
        self.residual_block_1 = _residual_stack([32, 64, 64])
        self.residual_block_2 = _residual_stack([64, 128])
        self.residual_block_3 = _residual_stack([128, 128])
        self.residual_block_4 = _residual_stack([128, 256, 256, 256])
        self.residual_block_5 = _residual_stack([256, 512, 512, 512])
        self.residual_block_6 = _residual_stack([512, 1024, 1024])
        # Decoder residual stages (inputs are upsampled features + skip, concatenated).
        self.residual_block_7 = _residual_stack([1024, 512, 256])
        self.residual_block_8 = _residual_stack([512, 256])
        self.residual_block_9 = _residual_stack([256, 256])
        self.residual_block_10 = _residual_stack([256, 128, 128])
        self.residual_block_11 = _residual_stack([128, 64])
        self.residual_block_12 = _residual_stack([64, 64])

        # Multi-scale units (width preserved: 4 branches x in/4 channels).
        self.multiscale_block_1 = MultiScaleUnit(128, 32, (3, 3, 5, 5), (1, 3, 3, 6))
        self.multiscale_block_2 = MultiScaleUnit(256, 64, (3, 3, 5, 5), (1, 3, 2, 3))
        self.multiscale_block_3 = MultiScaleUnit(64, 16, (3, 3, 5, 7), (1, 3, 2, 6))

        self.pool = nn.MaxPool2d(kernel_size=2)

        # Upsampling, deepest first.
        self.conv_transpose_1 = _upsample(1024, 512)
        self.conv_transpose_2 = _upsample(256, 256)
        self.conv_transpose_3 = _upsample(256, 128)
        self.conv_transpose_4 = _upsample(128, 64)
        self.conv_transpose_5 = _upsample(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Parameters
        ----------
        x : torch.Tensor
            ``N x in_channels x H x W`` float tensor. H and W that are not multiples
            of 32 are zero-padded (evenly on both sides) and the output is cropped
            back, so any size works; TIAToolbox's network itself only accepts
            multiples of 32.

        Returns
        -------
        torch.Tensor
            ``N x out_channels x H x W`` logits (no sigmoid).
        """
        h, w = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            # Zero-pad to the next multiple of 32 (split evenly), run, crop back.
            top, left = pad_h // 2, pad_w // 2
            x = nn.functional.pad(x, (left, pad_w - left, top, pad_h - top))
            return self._forward_aligned(x)[..., top : top + h, left : left + w]
        return self._forward_aligned(x)

    def _forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass for H and W that are multiples of :attr:`size_multiple`.

        Parameters
        ----------
        x : torch.Tensor
            ``N x in_channels x H x W``.

        Returns
        -------
        torch.Tensor
            ``N x out_channels x H x W`` logits.
        """
        # Encoder: full, 1/2, 1/4, 1/8, 1/16 resolution skips; bottleneck at 1/32.
        s1 = self.conv_block_1(x)
        s2 = self.residual_block_1(self.pool(s1))
        s3 = self.residual_block_3(
            self.multiscale_block_1(self.residual_block_2(self.pool(s2)))
        )
        s4 = self.residual_block_4(self.pool(s3))
        s5 = self.residual_block_5(self.pool(s4))
        y = self.residual_block_6(self.pool(s5))

        # Decoder.
        y = self.residual_block_7(torch.cat([self.conv_transpose_1(y), s5], dim=1))
        y = torch.cat([self.conv_transpose_2(y), s4], dim=1)
        y = self.residual_block_9(self.multiscale_block_2(self.residual_block_8(y)))
        y = self.residual_block_10(torch.cat([self.conv_transpose_3(y), s3], dim=1))
        y = torch.cat([self.conv_transpose_4(y), s2], dim=1)
        y = self.residual_block_12(self.multiscale_block_3(self.residual_block_11(y)))
        y = self.conv_block_2(torch.cat([self.conv_transpose_5(y), s1], dim=1))
        return self.conv_block_3(y)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> "NuClickNet":
        """Build a network and load a (TIAToolbox-format) state dict into it.

        A leading ``"module."`` prefix (left by ``nn.DataParallel``) is stripped and
        a ``{"state_dict": ...}`` wrapper is unwrapped; key names are otherwise used
        unchanged. Channel counts are read from the stem and head weights.

        Parameters
        ----------
        state_dict : Mapping[str, torch.Tensor]
            Weights, e.g. ``torch.load("nuclick_original-pannuke.pth")``.
        strict : bool, optional
            Passed to :meth:`torch.nn.Module.load_state_dict`. Default True.

        Returns
        -------
        NuClickNet
            The network in eval mode.
        """
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
            state_dict = state_dict["state_dict"]  # type: ignore[assignment]
        sd = {
            (k[len("module."):] if k.startswith("module.") else k): v
            for k, v in state_dict.items()
        }
        in_ch = int(sd["conv_block_1.0.conv_bn_relu.0.weight"].shape[1])
        out_ch = int(sd["conv_block_3.conv_bn_relu.0.weight"].shape[0])
        net = cls(in_channels=in_ch, out_channels=out_ch)
        net.load_state_dict(sd, strict=strict)
        return net.eval()
