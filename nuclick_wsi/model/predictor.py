"""The predictor: a loaded model on a device, at a precision, over batches of guided patches.

On CUDA the batch is copied from pinned memory without blocking and run under fp16 autocast; on the
CPU the precision is chosen by measurement (:mod:`nuclick_wsi.model.precision`): bf16 autocast only
on CPUs with native bf16 where a probe finds it faster, fp32 otherwise; channels_last throughout.
"""

from __future__ import annotations

import numpy as np
import torch

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.weights import LoadedModel
from nuclick_wsi.model.precision import choose_precision
from nuclick_wsi.model.runtime import choose_runtime


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is an error, never a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NuclickError("--device cuda was asked for but no CUDA device is available (use --device cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise NuclickError(f"unknown device {name!r} (choose auto, cpu or cuda)")


class Predictor:
    """Runs a loaded model over batches of guided patches.

    Parameters
    ----------
    model : LoadedModel
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16", "fp16"}
    runtime : {"auto", "torch", "openvino"}
        CPU inference runtime; ``auto`` measures (nuclick_wsi/model/runtime.py).
    tta : bool
        Test-time augmentation: the mean probability over the patch as given and flipped left-right,
        up-down and both (guidance flips with the image; 4x the network's work).
    """

    #: flip axes (of a B, C, H, W batch) averaged under ``tta``
    TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto", tta: bool = False,
                 runtime: str = "auto") -> None:
        self.model = model
        self.tta = bool(tta)
        self.device = resolve_device(device)
        net = model.net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.net = net
        #: what precision runs and why (``auto`` measures on CPUs with native bf16: nuclick_wsi/model/precision.py)
        self.precision = choose_precision(net, self.device, precision, patch_size=model.patch_size,
                                          arch_key=(model.arch, model.arch_args))
        self.dtype = self.precision.dtype
        #: PyTorch or OpenVINO, and why
        self.runtime = choose_runtime(net, self.device, runtime, precision=self.precision, arch=model.arch,
                                      patch_size=model.patch_size, arch_key=(model.arch, model.arch_args))
        self._compiled = self.runtime.engine

    @property
    def description(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        tta = ", tta x4" if self.tta else ""
        rt = ", openvino" if self.runtime.name == "openvino" else ""
        return f"{self.device.type} ({name}, {self.precision.name}{rt}, {torch.get_num_threads()} threads{tta})"

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, H, W) float32 for a (B, 5, H, W) float32 batch."""
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if not self.tta:
            return self._probability(x).cpu().numpy()
        total = None
        for dims in self.TTA_FLIPS:
            p = self._probability(x.flip(dims) if dims else x)
            p = p.flip([d - 1 for d in dims]) if dims else p  # (B, H, W): the batch's axes 2, 3 are 1, 2
            total = p if total is None else total + p
        return (total / len(self.TTA_FLIPS)).cpu().numpy()

    def _probability(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            return torch.sigmoid(torch.from_numpy(self._compiled(x.contiguous().numpy())))[:, 0]
        x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                logits = self.net(x)
        else:
            logits = self.net(x)
        return torch.sigmoid(logits.float())[:, 0]
