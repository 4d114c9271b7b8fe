"""Temporaries that name their owner, and the removal of those whose owner is gone.

A temporary is ``.nuclick-tmp-<tag>.<pid>@<host>~<final name>`` beside its final name (``tag``: 8 random
hex digits). A run on a folder removes the temporaries of dead owners: same host and the pid is not
alive. A temporary from another host is left alone unless older than ``foreign_after`` seconds (its
owner may be alive on a shared file system). Names of older versions (``.nuclick-tmp-<tag>-<name>``,
no owner) are treated like foreign ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TMP_MARK = ".nuclick-tmp-"
#: seconds after which a temporary whose owner cannot be checked (another host, old name) is removed
FOREIGN_AFTER_S = 24 * 3600.0

HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
_OWNED = re.compile(rf"^{re.escape(TMP_MARK)}[0-9a-f]{{8}}\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]*)~")
_LEGACY = re.compile(rf"^{re.escape(TMP_MARK)}[0-9a-f]{{8}}-")


@dataclass(frozen=True)
class TempInfo:
    """What a temporary's name says: its final name and owner (None for names without one)."""

    name: str
    pid: int | None
    host: str | None


def temp_name(final_name: str) -> str:
    """A temporary name for ``final_name`` owned by this process."""
    return f"{TMP_MARK}{uuid.uuid4().hex[:8]}.{os.getpid()}@{HOST}~{final_name}"


def parse(name: str) -> TempInfo | None:
    """The final name and owner of a temporary's file name, or None when it is not a temporary."""
    m = _OWNED.match(name) or _LEGACY.match(name)
    if m is None:
        return None
    pid = int(m.group("pid")) if "pid" in m.groupdict() else None
    host = m.groupdict().get("host")
    rest = name[m.end():]
    while True:  # a temporary of a temporary (a folder renamed aside): the outermost owner counts
        inner = _OWNED.match(rest) or _LEGACY.match(rest)
        if inner is None:
            return TempInfo(rest, pid, host)
        rest = rest[inner.end():]


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host (or cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def owner_gone(info: TempInfo, mtime: float, foreign_after: float = FOREIGN_AFTER_S) -> bool:
    """True when a temporary's owner is known to be gone (or it is foreign and old)."""
    if info.pid is not None and info.host == HOST:
        return info.pid != os.getpid() and not pid_alive(info.pid)
    return time.time() - mtime > foreign_after


def remove_path(path: Path) -> None:
    """Remove a file or a folder (a zarr store); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_orphans(folder: str | os.PathLike, foreign_after: float = FOREIGN_AFTER_S) -> list[Path]:
    """Remove the temporaries in ``folder`` whose owner is gone; return what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for e in entries:
        info = parse(e.name)
        if info is None:
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if owner_gone(info, mtime, foreign_after):
            remove_path(Path(e.path))
            removed.append(Path(e.path))
    return removed
