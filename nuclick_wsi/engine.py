"""Batched inference: device choice, precision, and batches prepared in the background.

A producer thread builds the next batches (slide reads, guidance maps) while the model runs; on CUDA
the batch is copied from pinned memory without blocking and run under fp16 autocast; on the CPU the
precision is chosen by measurement (``nuclick_wsi/precision.py``): bf16 autocast only on CPUs with
native bf16 where a probe finds it faster, fp32 otherwise; channels_last throughout.
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
from .precision import choose_precision


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
        net = model.net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.net = net
        #: what precision runs and why (``auto`` measures on CPUs with native bf16: nuclick_wsi/precision.py)
        self.precision = choose_precision(net, self.device, precision, patch_size=model.patch_size,
                                          arch_key=(model.arch, model.arch_args))
        self.dtype = self.precision.dtype

    @property
    def description(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.device.type} ({name}, {self.precision.name}, {torch.get_num_threads()} threads)"

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
