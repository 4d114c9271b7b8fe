"""Batched inference: device choice, precision, and batches prepared in the background.

A producer thread builds the next batches (slide reads, guidance maps) while the model runs; on CUDA
the batch is copied from pinned memory without blocking and run under fp16 autocast; on the CPU the
small networks run under bfloat16 autocast with channels_last, which is 2-3x faster here and gives
the same masks (``benchmarks/precision.py`` checks that).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import NuclickError
from .models.weights import LoadedModel


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


def resolve_precision(precision: str, device: torch.device, arch: str) -> torch.dtype | None:
    """The autocast dtype: fp16 on CUDA, bf16 on CPU for the light network, None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise NuclickError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if arch == "light-unet" else None


@dataclass
class Timer:
    """Busy seconds per stage (each stage runs in its own thread, so they may add up past wall time)."""

    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "infer": 0.0, "post": 0.0, "write": 0.0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, dt: float) -> None:
        with self.lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


_END = object()


def background(iterable: Iterable[Any], depth: int = 3) -> Iterator[Any]:
    """Iterate ``iterable`` in a daemon thread, ``depth`` items ahead; exceptions are re-raised here.

    When the consumer stops early (an error, or it closes this generator), the producer stops at
    its next item, closes ``iterable`` (so nested producers stop too) and is waited for: nothing
    is left running, or still reading a slide the caller is about to close.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=work, daemon=True, name="nuclick-producer")
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


class Predictor:
    """Runs a loaded model over batches of guided patches.

    Parameters
    ----------
    model : LoadedModel
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16", "fp16"}
    """

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto") -> None:
        self.model = model
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device, model.arch)
        net = model.net.to(self.device).eval()
        if self.device.type == "cpu" or self.dtype is not None:
            net = net.to(memory_format=torch.channels_last)
        self.net = net

    @property
    def description(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.device.type} ({name}, {prec}, {torch.get_num_threads()} threads)"

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, H, W) float32 for a (B, 5, H, W) float32 batch."""
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                logits = self.net(x)
        else:
            logits = self.net(x)
        return torch.sigmoid(logits.float())[:, 0].cpu().numpy()

    def run(self, batches: Iterable[tuple[np.ndarray, Any]], timer: Timer | None = None) -> Iterator[tuple[np.ndarray, Any]]:
        """Predict a stream of (batch, meta) pairs, preparing the next batches in the background."""
        for batch, meta in background(batches):
            t = time.perf_counter()
            prob = self(batch)
            if timer is not None:
                timer.add("infer", time.perf_counter() - t)
            yield prob, meta
