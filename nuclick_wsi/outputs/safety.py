"""Inputs are sacred: output names, overlap of outputs with inputs, stale outputs and free space.

* :func:`stem_problem` is the one rule for output stems (``segment --stem``, manifest stems, QuPath
  image names): a plain file name.
* :func:`refuse_overlap` refuses a run whose outputs or clean-up would touch an input (real paths,
  so links and ``..`` do not hide it).
* :func:`stale_outputs` finds the outputs an earlier run *wrote* (listed in its report, unchanged
  since): only those are removed, never a file found by name.
* :func:`refuse_foreign` refuses a run whose outputs would replace a file that nothing shows this
  tool wrote (a user's own ``S.xml`` or ``S.geojson`` in the output folder).
* :func:`check_free_space` refuses a run that cannot fit before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from nuclick_wsi.errors import OutputError

#: bytes per click in each polygon format, and in the report (about twice those measured on 3,000 nuclei)
BYTES_PER_CLICK = {"qupath": 1500, "asap": 3000, "geoparquet": 800, "report": 600}
#: bytes per label-store chunk that holds an instance (compressed uint32 labels with pyramid: ~37 KiB measured)
BYTES_PER_CHUNK = 128 * 1024
#: bytes of the QC page and review list (about 2 MB measured: the overview picture and the crops)
BYTES_QC = 4 * 1024 * 1024


def stem_problem(stem: str) -> str | None:
    """Why ``stem`` is not a plain file name for outputs, or None when it is."""
    if not stem:
        return "empty stem"
    if "/" in stem or "\\" in stem or stem in (".", "..") or os.path.isabs(stem):
        return f"stem {stem!r} must be a plain file name (no / or \\, not . or ..)"
    if stem.startswith("."):
        return f"stem {stem!r} must not start with '.'"
    if any(ord(c) < 32 for c in stem):
        return f"stem {stem!r} holds control characters"
    return None


def check_stem(stem: str) -> str:
    """Return ``stem``, or raise :class:`OutputError` when it is not a plain file name."""
    problem = stem_problem(stem)
    if problem:
        raise OutputError(f"output {problem}")
    return stem


def real(path: str | os.PathLike) -> Path:
    """The absolute path with links resolved (a missing tail is kept as written)."""
    return Path(os.path.realpath(os.fspath(path)))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overlap(inputs: Mapping[str, str | os.PathLike | None], outputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`OutputError` naming both paths when an output is, holds or lies inside an input.

    ``inputs`` maps a role ("slide", "clicks", ...) to a path; None entries are skipped.
    """
    ins = [(role, Path(p), real(p)) for role, p in inputs.items() if p is not None]
    for out in outputs:
        ro = real(out)
        for role, given, ri in ins:
            if _inside(ro, ri) or _inside(ri, ro):
                raise OutputError(f"output {out} would overwrite the {role} {given}; "
                                  "choose another output folder or --stem")


def refuse_input_among(role: str, given: str | os.PathLike, folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Raise :class:`OutputError` when input ``given`` lies in ``folder`` under one of the output ``names``."""
    if real(given).parent == real(folder) and Path(given).name in set(names):
        raise OutputError(f"output {Path(folder) / Path(given).name} would overwrite the {role} {given}; "
                          "choose another output folder")


def local_file(spec: str | os.PathLike | None) -> Path | None:
    """``spec`` as a path when it names an existing file or folder (weights may be ``tiatoolbox:...``)."""
    if spec is None:
        return None
    try:
        p = Path(spec)
        return p if p.exists() else None
    except (OSError, ValueError, TypeError):  # a name too long, a NUL: not a file
        return None


def stale_outputs(report: Path, keep: Iterable[Path]) -> list[Path]:
    """Outputs that the run recorded in ``report`` wrote beside it and that the new run does not keep.

    A file counts only when the earlier report (written by this tool: ``nuclick_wsi_version``) lists
    it under ``outputs``, it is in the report's folder and it was not modified after the report.
    """
    data = _ours(report)
    try:
        written = dict(data["outputs"]) if data is not None and not data.get("damaged") else {}
        done = report.stat().st_mtime_ns
    except (OSError, ValueError, TypeError, KeyError):
        return []
    keep_real = {real(p) for p in keep}
    stale = []
    for value in written.values():
        cand = report.parent / Path(str(value)).name
        try:
            if real(cand) in keep_real or cand == report or cand.stat().st_mtime_ns > done:
                continue
        except OSError:
            continue
        stale.append(cand)
    return stale


#: the end of a commit marker's name (``.S.nuclick-commit.json``)
COMMIT_MARKER_SUFFIX = ".nuclick-commit.json"


def commit_marker(report: Path) -> Path:
    """The hidden file naming the outputs this tool put in place beside ``report`` (``.S.nuclick-commit.json``):
    written before the earlier report goes, and again once the new one is in (see ``commit_outputs``)."""
    return report.with_name(f".{report.name.removesuffix('.report.json')}{COMMIT_MARKER_SUFFIX}")


#: how a report or marker of this tool begins (its first key), also when it was damaged after the run
_OUR_HEAD = re.compile(r'\s*\{\s*"nuclick_wsi_version"\s*:')


def _ours(path: Path) -> dict | None:
    """The JSON object in ``path`` when this tool wrote it (it holds ``nuclick_wsi_version``), else None;
    ``{"damaged": True}`` for a file that begins as ours but is no JSON (truncated on a failing disk)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {"damaged": True} if _OUR_HEAD.match(text) else None
    return data if isinstance(data, dict) and "nuclick_wsi_version" in data else None


def names_written(report: Path, derived: Iterable[Path] = (), damaged: Iterable[Path] = ()) -> set[str]:
    """Names beside ``report`` that this tool wrote.

    * The report itself and its ``outputs`` when the report is ours (``damaged`` instead when it is ours
      but unreadable).
    * Every name of the commit marker (a run killed between removing the earlier report and writing its
      own, or a report deleted since: Snakemake deletes it to redo a job), while a label store it names
      is still there: a marker left behind after the outputs were deleted proves nothing of a file
      saved there later.
    * ``derived`` (the QC page and review list): when that marker names them (the run wrote QC); with no
      trusted marker (an older nuclick-wsi), whenever the report is ours.
    """
    folder = report.parent
    marker = _ours(commit_marker(report))
    listed = marker.get("names") if marker is not None else None
    trusted = ({str(n) for n in listed} if isinstance(listed, list)
               and any(str(n).endswith(".zarr") and (folder / str(n)).is_dir() for n in listed) else None)
    names: set[str] = set(trusted or ())
    rep = _ours(report)
    if rep is not None:
        outputs = rep.get("outputs") if not rep.get("damaged") else {str(p): str(p) for p in damaged}
        names |= {report.name, *(Path(str(v)).name for v in (outputs.values() if isinstance(outputs, dict) else ()))}
        if trusted is None:
            names |= {Path(d).name for d in derived}
    return names


def refuse_foreign(paths: Mapping[str, Path], derived: Iterable[Path] = ()) -> set[str]:
    """Raise :class:`OutputError` naming the first output (of ``paths``, with its ``report``, or of
    ``derived``) that exists and that :func:`names_written` does not show this tool wrote; return the
    names that it shows.

    A file of ours edited since (an outline moved by hand) is still ours to replace: no time check.
    """
    derived = list(derived)
    ours = names_written(paths["report"], derived, damaged=paths.values())
    for path in [*paths.values(), *derived]:
        if os.path.lexists(path) and path.name not in ours:
            raise OutputError(f"{path} exists and was not written by nuclick-wsi (no {paths['report'].name} or "
                              "commit marker of ours names it); move it or choose another -o / --stem")
    return ours


def expected_bytes(n_clicks: int, formats: Iterable[str], chunks: int, *, qc: bool = False) -> int:
    """A generous estimate of the bytes a run writes (polygons, report, label chunks; ``qc``: the QC page)."""
    per_click = BYTES_PER_CLICK["report"] + sum(BYTES_PER_CLICK.get(f, 1500) for f in formats)
    return n_clicks * per_click + chunks * BYTES_PER_CHUNK + 1024 * 1024 + (BYTES_QC if qc else 0)


def check_free_space(folder: Path, needed: int) -> None:
    """Raise :class:`OutputError` when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"output folder {folder}: {free / 2**20:.1f} MiB free, the outputs need about "
                          f"{needed / 2**20:.1f} MiB; free some space or choose another -o")


def disk_full(exc: BaseException, folder: str | os.PathLike) -> OutputError | None:
    """A one-line :class:`OutputError` naming ``folder`` for a full disk (or quota), else None."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return OutputError(f"output folder {folder}: no space left on device"
                           f"{f' (writing {exc.filename})' if exc.filename else ''}; nothing was left half-written")
    return None
