"""Model checkpoints: building networks, saving and loading weights with their metadata.

A nuclick-wsi checkpoint is a ``torch.save``-d dict (loaded with ``weights_only=True``)::

    {"format": "nuclick-wsi/1", "arch": "light-unet" | "nuclick", "arch_args": {...},
     "state_dict": {...}, "metadata": {...}}

``metadata`` carries what inference needs (``mpp``, ``patch_size``, ``task``, ``postprocess``
thresholds) and what a user needs to trust it (data, validation metrics, version, command).
Published NuClick state dicts also load, recognised by their keys, with their authors' settings as
metadata: TIAToolbox's ``nuclick_original-pannuke.pth`` / ``nuclick_light-pannuke.pth``, the nuclick_torch
port's UNet, MONAI's ``pathology_nuclick_annotation`` BasicUNet (``nuclick_wsi/model/architectures/``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nuclick_wsi.errors import ModelError

FORMAT = "nuclick-wsi/1"
DEFAULT_WEIGHTS = "default-nuclei.pt"
#: the embedded default of each task that has one (the proposal detector: nuclick_wsi/model/DETECTOR_CARD.md)
DEFAULT_FILES = {"nuclei": DEFAULT_WEIGHTS, "detect": "default-detector.pt"}

#: post-processing defaults per task (the NuClick authors' code: threshold, min object px, min hole px)
POSTPROCESS_DEFAULTS: dict[str, dict[str, float]] = {
    "nuclei": {"threshold": 0.5, "min_object_px": 10, "min_hole_px": 30},
    "cells": {"threshold": 0.8, "min_object_px": 100, "min_hole_px": 100},
    "gland": {"threshold": 0.3, "min_object_px": 1000, "min_hole_px": 1000},
    "detect": {"threshold": 0.4, "min_distance_um": 2.0},  # heatmap peak cut, peaks closer than this merge
}
PATCH_DEFAULTS = {"nuclei": 128, "cells": 256, "gland": 512}


@dataclass
class LoadedModel:
    """A network ready for inference, with the metadata it came with."""

    net: nn.Module
    arch: str
    arch_args: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def mpp(self) -> float:
        return float(self.metadata["mpp"])

    @property
    def patch_size(self) -> int:
        return int(self.metadata.get("patch_size", PATCH_DEFAULTS[self.task]))

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", "nuclei"))

    @property
    def postprocess(self) -> dict[str, float]:
        out = dict(POSTPROCESS_DEFAULTS[self.task])
        out.update(self.metadata.get("postprocess", {}))
        return out


def build_network(arch: str, arch_args: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a network by name: ``light-unet`` (``widths``) or ``nuclick`` (the full network)."""
    arch_args = dict(arch_args or {})
    if arch == "light-unet":
        from nuclick_wsi.model.architectures.unet import LightUNet

        return LightUNet(**arch_args)
    if arch == "nuclick":
        from nuclick_wsi.model.architectures.nuclick import NuClickNet

        return NuClickNet(**arch_args)
    if arch == "s2d-unet":  # space-to-depth stem, full-resolution head (model/architectures/s2d_unet.py)
        from nuclick_wsi.model.architectures.s2d_unet import S2DUNet

        return S2DUNet(**arch_args)
    if arch == "s2d-detector":  # the proposal detector (model/architectures/detector.py)
        from nuclick_wsi.model.architectures.detector import S2DDetector

        return S2DDetector(**arch_args)
    if arch == "tia-light-unet":  # TIAToolbox's nuclick_light-pannuke layout (model/architectures/tia_unet.py)
        from nuclick_wsi.model.architectures.tia_unet import TiaLightUNet

        return TiaLightUNet(**arch_args)
    if arch == "nuclick-torch-unet":  # the NuClick authors' PyTorch port's UNet (model/architectures/nuclick_torch.py)
        from nuclick_wsi.model.architectures.nuclick_torch import NuclickTorchUNet

        return NuclickTorchUNet(**arch_args)
    if arch == "monai-nuclick-basicunet":  # MONAI's pathology_nuclick_annotation bundle (model/architectures/monai_basicunet.py)
        from nuclick_wsi.model.architectures.monai_basicunet import MonaiNuclickUNet

        return MonaiNuclickUNet(**arch_args)
    raise ModelError(f"unknown architecture {arch!r} (known: light-unet, s2d-unet, s2d-detector, nuclick, tia-light-unet, "
                     "nuclick-torch-unet, monai-nuclick-basicunet)")


def save_checkpoint(path: str | os.PathLike, net: nn.Module, arch: str, arch_args: dict[str, Any],
                    metadata: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Save weights and metadata atomically (``extra`` holds resumable training state)."""
    from nuclick_wsi._util.fs import atomic_output

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    ckpt = {"format": FORMAT, "arch": arch, "arch_args": dict(arch_args), "state_dict": state,
            "metadata": copy.deepcopy(metadata)}
    if extra:
        ckpt.update(extra)
    with atomic_output(path) as tmp:
        torch.save(ckpt, tmp)


def weights_sha256(net: torch.nn.Module) -> str:
    """SHA-256 over the network's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_weights_path(task: str = "nuclei") -> Path:
    """Path of the embedded default model of ``task`` (the nucleus model, or the proposal detector)."""
    return Path(str(resources.files("nuclick_wsi.model").joinpath(DEFAULT_FILES[task])))


def _looks_tiatoolbox(sd: dict[str, Any]) -> bool:
    return any(k.startswith("conv_block_1.0.conv_bn_relu") for k in sd) and "conv_transpose_1.weight" in sd


def tiatoolbox_metadata(task: str = "nuclei", name: str | None = None) -> dict[str, Any]:
    """Inference metadata for TIAToolbox's ``nuclick_original-pannuke`` weights.

    Their network takes RGB scaled to [0, 1] with the click at the centre of a 128x128 patch, like
    ours; their pretrained config and viewer work at about 0.25 um/px (40x). Their ``postproc``
    thresholds the sigmoid at 0.33 and removes objects < 10 px and holes < 30 px.
    """
    from nuclick_wsi.model.architectures.nuclick import TIATOOLBOX_NUCLICK_DEFAULTS as tia

    pp = tia["postproc"]
    return {"task": task, "mpp": 0.25, "patch_size": 128,
            "postprocess": {"threshold": pp["thresh"], "min_object_px": pp["min_size"], "min_hole_px": pp["min_hole_size"]},
            "source": f"TIAToolbox {name or tia['weights_name']} state dict"}


def load_model(weights: str | os.PathLike | None = None, *, task: str = "nuclei") -> LoadedModel:
    """Load a checkpoint (default: the embedded nucleus model) into a network in eval mode.

    Raises
    ------
    ModelError
        The file is missing or unreadable, is not a checkpoint, or its tensors do not fit the network.
    """
    if weights is None:
        if task not in DEFAULT_FILES:
            raise ModelError(
                f"no default model for task {task!r}: train one with "
                f"`nuclick-wsi train DATA -o {task}.pt --task {task}` and pass --weights {task}.pt"
            )
        path = default_weights_path(task)
        if not path.exists():
            raise ModelError(f"the embedded default model {path} is missing from this installation")
    # --- TIAToolbox pretrained names: tiatoolbox:NAME (download/cache in nuclick_wsi/model/tiatoolbox_weights.py) ---
    elif isinstance(weights, str) and weights.startswith("tiatoolbox:"):
        from nuclick_wsi.model.tiatoolbox_weights import tiatoolbox_weights_path

        path, _ = tiatoolbox_weights_path(weights)
    # --- end of TIAToolbox names ---
    else:
        path = Path(weights)
        if not path.exists():
            raise ModelError(f"weights file {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: a bad file gets our one line below
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text goes on to suggest weights_only=False: not ours to say
        raise ModelError(f"{path}: holds Python objects besides weights (a whole pickled model, or another tool's "
                         "file); nuclick-wsi loads only weights (a state dict or its own checkpoint) and never "
                         "runs code from a weights file") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: expected a checkpoint dict or a state dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == FORMAT:
        arch, arch_args, sd, meta = ckpt["arch"], ckpt.get("arch_args", {}), ckpt["state_dict"], ckpt.get("metadata", {})
    else:
        from nuclick_wsi.model.architectures import monai_basicunet, nuclick_torch
        from nuclick_wsi.model.architectures.tia_unet import looks_tia_light  # TIAToolbox's nuclick_light-pannuke layout

        sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else monai_basicunet.unwrap_monai(ckpt)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if nuclick_torch.looks_nuclick_torch_unet(sd):
            arch, arch_args, meta = "nuclick-torch-unet", {}, {**nuclick_torch.NUCLICK_TORCH_UNET_META, "task": task}
        elif monai_basicunet.looks_monai_basicunet(sd):
            arch, arch_args, meta = "monai-nuclick-basicunet", {}, {**monai_basicunet.MONAI_NUCLICK_META, "task": task}
        elif looks_tia_light(sd):
            arch, arch_args = "tia-light-unet", {}
            meta = tiatoolbox_metadata(task, "nuclick_light-pannuke")
        elif _looks_tiatoolbox(sd):
            arch, arch_args = "nuclick", {}  # also nuclick_torch's NuClick_NN: same keys, its threshold 0.5
            meta = tiatoolbox_metadata(task, "nuclick_original-pannuke (or nuclick_torch NuClick_NN: same keys)")
        else:
            raise ModelError(f"{path}: neither a nuclick-wsi checkpoint nor a published NuClick state dict "
                             "(TIAToolbox, nuclick_torch, MONAI pathology_nuclick_annotation)")
    if "mpp" not in meta:
        raise ModelError(f"{path}: the checkpoint does not say at which um/px it works (metadata 'mpp')")
    net = build_network(arch, arch_args)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ModelError(f"{path}: weights do not fit the {arch} network: {' '.join(first[:2])[:300]}") from exc
    net.eval()
    return LoadedModel(net=net, arch=arch, arch_args=dict(arch_args), metadata=dict(meta), source=str(path))
