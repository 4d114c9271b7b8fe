"""Atomic outputs: write under a temporary name in the same folder, rename when complete.

A temporary is ``.nuclick-tmp-<tag>.<pid>@<host>~<final name>`` beside its final name (``tag``: 8 random
hex digits). A run on a folder removes the temporaries of dead owners (:func:`cleanup_temporaries`): same
host and the pid is not alive. A temporary from another host is left alone unless older than
``foreign_after`` seconds (its owner may be alive on a shared file system). Names of older versions
(``.nuclick-tmp-<tag>-<name>``, no owner) are treated like foreign ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nuclick_wsi.errors import OutputError

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


def user_cache_dir() -> Path:
    """nuclick-wsi's cache folder: ``$NUCLICK_WSI_CACHE_DIR``, else ``$XDG_CACHE_HOME/nuclick-wsi``, else
    ``~/.cache/nuclick-wsi`` (probe results, converted models, QC overviews; safe to delete)."""
    base = os.environ.get("NUCLICK_WSI_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nuclick-wsi"


def temp_name(final_name: str) -> str:
    """A temporary name for ``final_name`` owned by this process."""
    return f"{TMP_MARK}{uuid.uuid4().hex[:8]}.{os.getpid()}@{HOST}~{final_name}"


def temp_path_for(final: Path) -> Path:
    """A temporary sibling of ``final`` owned by this process (see :func:`cleanup_temporaries`)."""
    return final.with_name(temp_name(final.name))


def parse_temporary(name: str) -> TempInfo | None:
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


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; raise :class:`OutputError` (one line) when it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")
    return folder


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success replace ``final`` with it, on failure remove it.

    Works for files and folders (a zarr store). The temporary lives beside ``final`` so the rename
    stays on one file system.
    """
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = temp_path_for(final)
    try:
        yield tmp
        replace_file(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def replace_file(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing a file or a folder there.

    A folder cannot be replaced in one rename, so an old one is first renamed aside (to a temporary
    name that :func:`cleanup_temporaries` recognises) and deleted only after the new one is in place:
    a kill at any moment leaves either the old or the new complete output under the final name.
    """
    if final.is_dir() and not final.is_symlink():
        aside = temp_path_for(final)
        os.replace(final, aside)
        os.replace(tmp, final)
        remove_path(aside)
    else:
        if final.is_symlink() and tmp.is_dir():  # a link cannot be renamed over by a folder: replace the
            final.unlink()  # link itself, as os.replace does for a file (what it points to stays)
        os.replace(tmp, final)


def cleanup_temporaries(folder: str | os.PathLike, foreign_after: float = FOREIGN_AFTER_S) -> list[Path]:
    """Remove the temporaries in ``folder`` whose owner is gone (killed runs); return what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for e in entries:
        info = parse_temporary(e.name)
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
