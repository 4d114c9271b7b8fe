"""Atomic outputs: write under a temporary name in the same folder, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from nuclick_wsi.errors import OutputError

TMP_MARK = ".nuclick-tmp-"


def temp_path_for(final: Path) -> Path:
    """A temporary sibling of ``final`` that ``cleanup_temporaries`` recognises."""
    return final.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{final.name}")


def remove_path(path: Path) -> None:
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
        os.replace(tmp, final)


def cleanup_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries left in ``folder`` by a killed run; return what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_MARK):
                remove_path(p)
                removed.append(p)
    return removed
