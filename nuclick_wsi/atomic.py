"""Atomic outputs: write under a temporary name in the same folder, rename when complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError
from .outputs.temporaries import TMP_MARK, remove_orphans, remove_path, temp_name

__all__ = ["TMP_MARK", "atomic_output", "cleanup_temporaries", "ensure_writable_dir", "replace", "temp_path_for"]


def temp_path_for(final: Path) -> Path:
    """A temporary sibling of ``final`` that ``cleanup_temporaries`` recognises."""
    return final.with_name(temp_name(final.name))


def _remove(path: Path) -> None:
    remove_path(path)


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
        replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing a file or a folder there.

    A folder cannot be replaced in one rename, so an old one is first renamed aside (to a temporary
    name that :func:`cleanup_temporaries` recognises) and deleted only after the new one is in place:
    a kill at any moment leaves either the old or the new complete output under the final name.
    """
    if final.is_dir() and not final.is_symlink():
        aside = temp_path_for(final)
        os.replace(final, aside)
        os.replace(tmp, final)
        _remove(aside)
    else:
        os.replace(tmp, final)


def cleanup_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries left in ``folder`` by killed runs (owner gone); return what was removed."""
    return remove_orphans(folder)
