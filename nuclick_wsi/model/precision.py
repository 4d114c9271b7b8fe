"""Inference and training precision chosen by measurement, never by assumption.

bf16 autocast is 2-3x faster than fp32 on CPUs with native bf16 instructions (AVX512-BF16, AMX), and
about 7x *slower* on CPUs without them, where torch falls back to a slow convolution path. ``auto``
therefore:

1. on CUDA picks fp16 autocast;
2. on a CPU without native bf16 (``torch.cpu._is_avx512_bf16_supported()`` and
   ``_is_amx_tile_supported()`` both false) picks fp32 without measuring anything;
3. otherwise times a few forward passes of the actual network in fp32 and in bf16 and keeps bf16
   only when it is at least ``MIN_GAIN`` faster. The result is cached per machine (CPU model and
   capability), thread count, torch version and network shape in a small JSON file
   (``$NUCLICK_WSI_CACHE_DIR``, else ``$XDG_CACHE_HOME/nuclick-wsi``, else ``~/.cache/nuclick-wsi``),
   so the probe (a second or two) runs once per machine and model.

The choice and its reason go into ``segment``'s report and ``train``'s checkpoint metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nuclick_wsi._util.fs import user_cache_dir
from nuclick_wsi.errors import NuclickError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: bf16 must beat fp32 by this factor to be chosen (it costs a little accuracy; probes are noisy)
MIN_GAIN = 1.05


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a network runs at, and why."""

    name: str
    reason: str
    measured: dict[str, float] = field(default_factory=dict)  #: patches/s by precision, when probed

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain fp32."""
        return DTYPES[self.name]


def cpu_description() -> dict[str, Any]:
    """What decides CPU speed at each precision: model name, torch's capability, bf16/AMX support."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "threads": torch.get_num_threads(),
    }


def native_bf16(cpu: dict[str, Any]) -> bool:
    """True when the CPU has bf16 instructions that torch's CPU kernels use.

    The instructions must be there (AVX512-BF16 or AMX) *and* torch must run its AVX512 kernels:
    with ``ATEN_CPU_CAPABILITY=avx2`` (or a build without them) the bf16 paths are the slow ones.
    """
    return bool(cpu["avx512_bf16"] or cpu["amx"]) and str(cpu["capability"]).upper().startswith("AVX512")


def cache_path() -> Path:
    """The JSON file holding earlier probe results."""
    return user_cache_dir() / "precision.json"


def read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, value: dict[str, Any]) -> bool:
    """Add one entry, atomically; False when the cache cannot be written (read-only home...)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def probe_speed(net: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, *,
                patch_size: int, in_channels: int = 5, batch: int = 8, repeats: int = 3) -> float:
    """Patches per second of ``net``'s forward pass at ``dtype`` (best of ``repeats`` after a warm-up).

    The network is put in eval mode for the probe and given back in the mode it was in.
    """
    was_training = net.training
    net.eval()
    x = torch.rand(batch, in_channels, patch_size, patch_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    best = float("inf")
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            net(x)
            for _ in range(repeats):
                t = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - t)
    finally:
        net.train(was_training)
    return batch / best


def for_training(choice: PrecisionChoice, device: torch.device) -> PrecisionChoice:
    """The precision to *train* at, from what inference would run: fp16 trains only with loss scaling.

    ``auto`` picks fp16 on CUDA for inference. A GPU with bf16 (Ampere and later) trains in bf16 instead,
    which needs no loss scaling; an older one keeps fp16, and the training loop scales its loss
    (:func:`grad_scaler`).
    """
    if choice.name == "fp16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16", f"{choice.reason}; trains in bf16 (this GPU has it; fp16 would need loss scaling)")
    return choice


def grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """A loss scaler for fp16 autocast, whose small gradients underflow without one; None for other precisions."""
    if dtype is not torch.float16:
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")


def choose_precision(net: torch.nn.Module, device: torch.device, requested: str = "auto", *,
                     patch_size: int, arch_key: Any = None, in_channels: int = 5,
                     probe: Callable[..., float] = probe_speed, cache: Path | None = None) -> PrecisionChoice:
    """The precision to run ``net`` at on ``device``: what was asked for, or ``auto``'s measured pick.

    Parameters
    ----------
    net : torch.nn.Module
        The network as it will run (already on ``device``).
    requested : {"auto", "fp32", "bf16", "fp16"}
    arch_key
        Anything JSON-serialisable naming the network's shape (architecture and its arguments):
        part of the cache key, with the CPU, thread count and torch version.
    """
    if requested not in PRECISIONS:
        raise NuclickError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    if requested != "auto":
        return PrecisionChoice(requested, f"asked for (--precision {requested})")
    if device.type == "cuda":
        return PrecisionChoice("fp16", "CUDA: fp16 autocast")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"{device.type}: fp32")
    cpu = cpu_description()
    if not native_bf16(cpu):
        return PrecisionChoice("fp32", f"CPU without native bf16 ({cpu['capability']}, no AVX512-BF16/AMX): fp32")
    path = cache or cache_path()
    key = json.dumps([cpu, torch.__version__, patch_size, in_channels, arch_key], sort_keys=True, default=str)
    hit = read_cache(path).get(key)
    if isinstance(hit, dict) and hit.get("name") in ("fp32", "bf16") and isinstance(hit.get("measured"), dict):
        return PrecisionChoice(hit["name"], str(hit.get("reason", "")) + " (cached probe)", dict(hit["measured"]))
    measured = {name: round(probe(net, device, DTYPES[name], patch_size=patch_size, in_channels=in_channels), 1)
                for name in ("fp32", "bf16")}
    name = "bf16" if measured["bf16"] >= MIN_GAIN * measured["fp32"] else "fp32"
    reason = (f"probe on {cpu['capability']} with native bf16, {cpu['threads']} threads: "
              f"fp32 {measured['fp32']:.0f}, bf16 {measured['bf16']:.0f} patches/s")
    if not write_cache(path, key, {"name": name, "reason": reason, "measured": measured}):
        reason += f" (cache {path} not writable: probed each run)"
    return PrecisionChoice(name, reason, measured)
