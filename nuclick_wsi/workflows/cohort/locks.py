"""Lock files that are safe on shared file systems, a heartbeat that keeps them fresh, and the
temporaries a lock holder cleans up.

Threads: a :class:`LockKeeper` owns one daemon heartbeat thread (started with its first lock) that
refreshes the locks it holds; the process's keeper is :data:`KEEPER`. Everything else runs in the
caller's thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nuclick_wsi._util.fs import parse_temporary, pid_alive, remove_path, temp_path_for
from nuclick_wsi.errors import NuclickError, OutputError
from nuclick_wsi.outputs.paths import POLYGON_SUFFIXES, output_paths
from nuclick_wsi.outputs.safety import commit_marker


LOCK_SUFFIX = ".lock"
FAILED_SUFFIX = ".failed.json"

# --------------------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------------------

HOST = socket.gethostname()


def proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux clock ticks since boot), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class LockKeeper:
    """The locks a process holds: their tokens, and one daemon thread refreshing their modification time.

    The heartbeat thread only touches the lock files it is given (``FileLock.touch``); the tokens
    tell a lock file of this process from one an older process with the same pid left behind.
    """

    def __init__(self) -> None:
        self.tokens: set[str] = set()  #: tokens of the locks held (or being taken) through this keeper
        self._locks: dict[int, FileLock] = {}
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, lock: FileLock) -> None:
        with self._guard:
            self._locks[id(lock)] = lock
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="nuclick-lock-heartbeat")
                self._thread.start()
            else:
                self._wake.set()

    def remove(self, lock: FileLock) -> None:
        with self._guard:
            self._locks.pop(id(lock), None)

    def _run(self) -> None:
        while True:
            with self._guard:
                locks = list(self._locks.values())
            interval = min([lk.heartbeat for lk in locks] or [5.0])
            now = time.time()
            for lk in locks:
                if now - lk.touched >= lk.heartbeat:
                    lk.touch()
            self._wake.wait(interval)
            self._wake.clear()


KEEPER = LockKeeper()
"""The process's lock keeper (the default of every :class:`FileLock`)."""


@dataclass
class LockInfo:
    """What a lock file says about its holder."""

    host: str
    pid: int
    start: str | None
    time: float
    token: str

    @classmethod
    def parse(cls, raw: bytes) -> LockInfo | None:
        try:
            d = json.loads(raw.decode("utf-8"))
            return cls(host=str(d["host"]), pid=int(d["pid"]), start=d.get("start"), time=float(d["time"]),
                       token=str(d["token"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        return f"{self.host}:{self.pid}"


class FileLock:
    """A lock file held by one process at a time, safe on shared (NFS, Lustre, GPFS) file systems.

    Parameters
    ----------
    path : path-like
        The lock file.
    stale_after : float
        Seconds without a heartbeat after which a lock is stale, whoever holds it.
    heartbeat : float, optional
        Seconds between refreshes of the lock's modification time (default: ``stale_after / 4``,
        at most 30 s).
    keeper : LockKeeper, optional
        Who keeps it fresh and knows its token (default: the process's :data:`KEEPER`).
    """

    def __init__(self, path: str | os.PathLike, stale_after: float = 600.0, heartbeat: float | None = None,
                 keeper: LockKeeper | None = None) -> None:
        self.path = Path(path)
        self.keeper = keeper or KEEPER
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat) if heartbeat is not None else max(0.5, min(30.0, self.stale_after / 4))
        self.token: str | None = None
        self.touched = 0.0
        self.holder: LockInfo | None = None  #: who held it when ``acquire`` failed

    # -- inspection ----------------------------------------------------------------------------
    def _read(self) -> tuple[bytes, float] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
            return raw, mtime
        except FileNotFoundError:
            return None

    def is_stale(self, info: LockInfo | None, mtime: float, now: float | None = None) -> bool:
        """Whether a lock with this content and modification time is stale."""
        now = time.time() if now is None else now
        if now - mtime > self.stale_after:
            return True  # no heartbeat for too long (a killed process on another node, a hung one)
        if info is None:
            return now - mtime > min(5.0, self.stale_after)  # a file being written, or left half-written
        if info.host == HOST:
            if info.pid == os.getpid():
                return info.token not in self.keeper.tokens  # our pid, reused, from an older process
            if not pid_alive(info.pid):
                return True
            start = proc_start(info.pid)
            if info.start and start and start != info.start:
                return True  # the pid belongs to another process now
        return False

    def state(self) -> LockInfo | None | bool:
        """False when there is no live lock; else the holder (None when unreadable)."""
        got = self._read()
        if got is None:
            return False
        info = LockInfo.parse(got[0])
        if self.is_stale(info, got[1]):
            return False
        return info

    # -- acquire / release -----------------------------------------------------------------------
    def _create(self, content: bytes) -> bool:
        tmp = temp_path_for(self.path)
        try:
            with open(tmp, "xb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            raise OutputError(f"cannot create lock {self.path}: folder {self.path.parent} does not exist") from None
        try:
            os.link(tmp, self.path)  # atomic, and the lock is complete the moment it exists
            return True
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _break(self, raw: bytes) -> None:
        """Remove a stale lock whose content was ``raw``, without removing a fresh one by mistake."""
        aside = temp_path_for(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it
        try:
            moved = aside.read_bytes()
        except OSError:
            moved = raw
        if moved != raw:  # another process replaced it meanwhile: put the fresh lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)

    def acquire(self, timeout: float = 0.0, poll: float = 0.5) -> bool:
        """Take the lock; wait up to ``timeout`` seconds for a live holder. True when taken."""
        deadline = time.monotonic() + timeout
        while True:
            token = uuid.uuid4().hex
            info = {"host": HOST, "pid": os.getpid(), "start": proc_start(os.getpid()), "time": time.time(),
                    "token": token}
            self.keeper.tokens.add(token)
            if self._create((json.dumps(info) + "\n").encode()):
                self.token, self.touched, self.holder = token, time.time(), None
                self.keeper.add(self)
                return True
            self.keeper.tokens.discard(token)
            got = self._read()
            if got is None:
                continue  # released meanwhile
            holder = LockInfo.parse(got[0])
            if self.is_stale(holder, got[1]):
                self._break(got[0])
                continue
            self.holder = holder
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def touch(self) -> None:
        """Refresh the lock's modification time (the heartbeat does it)."""
        self.touched = time.time()
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.token is None:
            return
        self.keeper.remove(self)
        got = self._read()
        if got is not None:
            info = LockInfo.parse(got[0])
            if info is not None and info.token == self.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        self.keeper.tokens.discard(self.token)
        self.token = None

    def __enter__(self) -> FileLock:
        if not self.acquire():
            who = self.holder.describe() if self.holder else "another process"
            raise NuclickError(f"{self.path} is held by {who}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# per-slide files
# --------------------------------------------------------------------------------------------------


def stem_file_names(stem: str) -> set[str]:
    """Every file name a slide's run may leave in the output folder (all formats, gzip or not; the commit marker)."""
    names = {p.name for gz in (False, True) for p in output_paths(".", stem, tuple(POLYGON_SUFFIXES), gz, glands=True).values()}
    return names | {f"{stem}{FAILED_SUFFIX}", f"{stem}{LOCK_SUFFIX}", commit_marker(Path(f"{stem}.report.json")).name}


def remove_temporaries(out_dir: str | os.PathLike, names: set[str]) -> list[Path]:
    """Remove temporaries (``.nuclick-tmp-*``) of the given final names from ``out_dir``.

    Only call it while holding the lock of those names: a live process's temporaries look the same.
    """
    removed = []
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return removed
    for e in entries:
        info = parse_temporary(e.name)
        if info and info.name in names:
            remove_path(Path(e.path))
            removed.append(Path(e.path))
    return removed

