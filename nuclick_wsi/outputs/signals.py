"""SIGTERM (what SLURM sends at the time limit) and SIGHUP handled like SIGINT.

Inside :func:`signals_as_interrupt` these signals raise :class:`Terminated`, a ``KeyboardInterrupt``,
so the clean-up that runs for Ctrl-C (temporaries removed, locks released) runs for them too; the
CLI then exits with ``128 + signum`` as a shell does for a killed process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """The exit status for an interrupt: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def _raise(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
