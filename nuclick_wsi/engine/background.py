"""Work in a background thread: a bounded queue between a producer and its consumer, and stage timers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


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
