"""The CPU inference runtime chosen by measurement: PyTorch, or OpenVINO where it is installed and faster.

OpenVINO compiles the network for the CPU it runs on; on the 2-core CPUs we measured it ran the
default model 1.5-1.7x faster than PyTorch at fp32 with the same outputs (max difference of the
probabilities ~4e-5). ``auto`` therefore times both, once per machine, thread count, versions,
network shape and precision, and keeps OpenVINO only when it is at least ``MIN_GAIN`` faster; the
result shares the precision probe's cache file. A network OpenVINO cannot convert stays on PyTorch
and the reason says so. ``NUCLICK_WSI_RUNTIME`` (``torch`` or ``openvino``) overrides ``auto``
(the test suite sets ``torch``). Training always runs PyTorch.

The converted network (OpenVINO IR) is cached on disk by a hash of its weights, shape and the
OpenVINO version, so a second process loads it in well under a second instead of converting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nuclick_wsi._util.fs import user_cache_dir
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.weights import weights_sha256
from nuclick_wsi.model.precision import (MIN_GAIN, PrecisionChoice, cache_path, cpu_description, read_cache,
                                         write_cache)

RUNTIMES = ("auto", "torch", "openvino")
#: the architectures ``auto`` offers to OpenVINO (the package's own; stand-ins and exotic nets stay on PyTorch)
OPENVINO_ARCHS = frozenset({"s2d-unet", "light-unet", "nuclick", "tia-light-unet", "nuclick-torch-unet",
                            "monai-nuclick-basicunet"})
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a network runs on, why, and (OpenVINO) the compiled network."""

    name: str  #: "torch" or "openvino"
    reason: str
    measured: dict[str, float] = field(default_factory=dict)  #: patches/s by runtime, when probed
    engine: Any = field(default=None, compare=False, repr=False)  #: an OpenVinoNet when name == "openvino"


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (or does not import)."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - a broken install is "not available", reported by the caller
        return None
    return str(openvino.__version__)


class OpenVinoNet:
    """``net`` compiled by OpenVINO for this CPU: logits (B, 1, H, W) for a (B, C, H, W) float32 batch.

    Any batch size runs (the batch axis is dynamic); results do not depend on the batch size.
    """

    def __init__(self, net: torch.nn.Module, *, patch_size: int, in_channels: int = 5, precision: str = "fp32",
                 threads: int | None = None, cache_dir: Path | None = None) -> None:
        import openvino as ov

        if precision not in OV_PRECISION:
            raise NuclickError(f"OpenVINO runs fp32 or bf16, not {precision!r}")
        shape = [-1, in_channels, patch_size, patch_size]
        key = hashlib.sha256(json.dumps([weights_sha256(net), shape, ov.__version__]).encode()).hexdigest()[:24]
        folder = cache_dir or user_cache_dir() / "openvino"
        xml = folder / f"{key}.xml"
        core = ov.Core()
        if xml.exists() and xml.with_suffix(".bin").exists():
            model = core.read_model(str(xml))
        else:
            was_training = net.training
            net.eval()
            try:
                with torch.no_grad():
                    model = ov.convert_model(net, example_input=torch.rand(1, in_channels, patch_size, patch_size),
                                             input=[ov.PartialShape(shape)])
            finally:
                net.train(was_training)
            self._save(ov, model, xml)
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line oneDNN story
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise NuclickError(f"OpenVINO cannot compile the network at {precision} on this CPU: {first}") from exc
        self._requests = threading.local()  # one infer request per thread: a request serves one call at a time

    @staticmethod
    def _save(ov, model, xml: Path) -> None:
        """Write the IR for the next process; a cache that cannot be written only costs a conversion."""
        try:
            xml.parent.mkdir(parents=True, exist_ok=True)
            tmp = xml.with_name(f".{xml.stem}-{os.getpid()}.xml")
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        except OSError:
            pass

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._requests, "request", None)
        if request is None:  # slides in flight share the network, each from its own thread
            request = self._requests.request = self.compiled.create_infer_request()
        out = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.array(out[0], copy=True)  # the request reuses its output buffer


def _probe(fn: Callable[[np.ndarray], Any], x: np.ndarray, repeats: int = 3) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def _torch_forward(net: torch.nn.Module, precision: PrecisionChoice) -> Callable[[np.ndarray], Any]:
    def run(x: np.ndarray):
        with torch.inference_mode(), torch.autocast("cpu", dtype=precision.dtype or torch.float32,
                                                    enabled=precision.dtype is not None):
            return net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    return run


def choose_runtime(net: torch.nn.Module, device: torch.device, requested: str = "auto", *,
                   precision: PrecisionChoice, arch: str, patch_size: int, in_channels: int = 5,
                   arch_key: Any = None, cache: Path | None = None, batch: int = 8,
                   probe: Callable[[Callable[[np.ndarray], Any], np.ndarray], float] = None) -> RuntimeChoice:
    """The runtime to run ``net`` on: what was asked for, or ``auto``'s measured pick.

    Raises
    ------
    NuclickError
        An unknown runtime; ``openvino`` asked for without OpenVINO installed, off the CPU, or at a
        precision it does not run.
    """
    if requested not in RUNTIMES:
        raise NuclickError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    env = os.environ.get("NUCLICK_WSI_RUNTIME", "")
    if requested == "auto" and env in ("torch", "openvino"):
        requested, why = env, f"NUCLICK_WSI_RUNTIME={env}"
    else:
        why = f"asked for (--runtime {requested})"
    if requested == "torch":
        return RuntimeChoice("torch", why)
    version = openvino_version()
    if requested == "openvino":
        if version is None:
            raise NuclickError("--runtime openvino: the openvino package is not installed (pip install openvino)")
        if device.type != "cpu" or precision.name not in OV_PRECISION:
            raise NuclickError(f"--runtime openvino runs on the CPU at fp32 or bf16, not {device.type} "
                               f"{precision.name}")
        return RuntimeChoice("openvino", why, engine=OpenVinoNet(net, patch_size=patch_size, in_channels=in_channels,
                                                                 precision=precision.name))
    if device.type != "cpu":
        return RuntimeChoice("torch", f"{device.type}: PyTorch")
    if version is None:
        return RuntimeChoice("torch", "PyTorch (OpenVINO not installed)")
    if arch not in OPENVINO_ARCHS or precision.name not in OV_PRECISION:
        return RuntimeChoice("torch", f"PyTorch (OpenVINO not tried for {arch} at {precision.name})")
    cpu = cpu_description()
    path = cache or cache_path()
    key = json.dumps(["runtime", cpu, torch.__version__, version, precision.name, patch_size, in_channels, arch_key],
                     sort_keys=True, default=str)
    hit = read_cache(path).get(key)
    engine = None
    if isinstance(hit, dict) and hit.get("name") in ("torch", "openvino") and isinstance(hit.get("measured"), dict):
        name, reason, measured = hit["name"], str(hit.get("reason", "")) + " (cached probe)", dict(hit["measured"])
    else:
        try:
            engine = OpenVinoNet(net, patch_size=patch_size, in_channels=in_channels, precision=precision.name)
        except Exception as exc:  # noqa: BLE001 - any conversion failure keeps the network on PyTorch, said why
            return RuntimeChoice("torch", f"PyTorch (OpenVINO could not convert {arch}: {type(exc).__name__})")
        x = np.random.default_rng(0).random((batch, in_channels, patch_size, patch_size), dtype=np.float32)
        probe = probe or _probe
        measured = {"torch": round(probe(_torch_forward(net, precision), x), 1), "openvino": round(probe(engine, x), 1)}
        name = "openvino" if measured["openvino"] >= MIN_GAIN * measured["torch"] else "torch"
        reason = (f"probe at {precision.name}, {cpu['threads']} threads: PyTorch {measured['torch']:.0f}, "
                  f"OpenVINO {version.split('-')[0]} {measured['openvino']:.0f} patches/s")
        if not write_cache(path, key, {"name": name, "reason": reason, "measured": measured}):
            reason += f" (cache {path} not writable: probed each run)"
    if name == "openvino" and engine is None:
        engine = OpenVinoNet(net, patch_size=patch_size, in_channels=in_channels, precision=precision.name)
    return RuntimeChoice(name, reason, measured, engine if name == "openvino" else None)
