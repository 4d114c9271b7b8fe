"""Cohorts: a manifest of slides, run one after another or by many processes at once.

A manifest is a CSV file with a header and one row per slide::

    slide,points,mpp,weights,stem
    slides/A.svs,clicks/A.geojson,,,
    slides/B.tif,clicks/B.geojson,0.25,models/other.pt,B-rescan

``slide`` and ``points`` are required; ``mpp`` (level-0 um/px, overriding the slide's own),
``weights`` (a checkpoint), ``stem`` (output name, default: the slide's file name without
extension) and ``bounds_offset`` (true/false: QuPath's frame for this slide, see ``segment
--bounds-offset``) are optional. Relative paths are taken from the manifest's folder. Other columns are
ignored (they are listed as a warning).

:func:`run_batch` segments every row into ``OUT/<stem>.*`` (the outputs of
:func:`nuclick_wsi.pipeline.segment`). It is safe to run several batch processes on one manifest
and one output folder at the same time, on one machine or many (SLURM array tasks, Snakemake
jobs):

* a slide is worked on only while its lock file ``OUT/<stem>.lock`` is held. The lock is created
  atomically (hard link of a complete file, or ``O_CREAT | O_EXCL``) and names its holder (host, pid,
  process start time, a random token); the holder refreshes its modification time every few
  seconds. A lock is stale, and is removed, when its process is gone (same host), or when it has
  not been refreshed for ``stale_after`` seconds (any host);
* outputs are written under temporary names and renamed when complete (``report.json`` last), so a
  killed process leaves no partial output; its temporaries are removed by the next process that
  takes the slide's lock;
* a slide whose outputs are complete (and newer than its slide and clicks files) is skipped, so a
  rerun resumes where a killed or failed run stopped, and redoes a slide whose clicks were
  exported again;
* a slide that fails leaves ``OUT/<stem>.failed.json`` (its error) and the others go on.

``OUT/batch-summary.csv`` records every row's state at the end of each run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import TMP_MARK, _remove, atomic_output, ensure_writable_dir
from .errors import NuclickError, OutputError
from .pipeline import FORMATS, SegmentOptions, output_paths, outputs_complete, segment, slide_stem

MANIFEST_COLUMNS = ("slide", "points", "mpp", "weights", "stem", "bounds_offset")
REQUIRED_COLUMNS = ("slide", "points")
SUMMARY_NAME = "batch-summary.csv"
SUMMARY_COLUMNS = ("stem", "status", "clicks", "segmented", "skipped", "seconds", "slide", "points", "error")
RESERVED_STEMS = ("batch-summary", SUMMARY_NAME)
LOCK_SUFFIX = ".lock"
FAILED_SUFFIX = ".failed.json"
#: statuses of a row in a batch summary
STATUSES = ("segmented", "complete", "failed", "running", "pending")
MAX_MPP = 20.0

_TMP_RE = re.compile(rf"^(?:{re.escape(TMP_MARK)}[0-9a-f]{{8}}-)+(?P<name>.+)$")


class ManifestError(NuclickError):
    """A manifest with bad rows; ``problems`` lists every one (``line N (stem): what``)."""

    def __init__(self, path: str | os.PathLike, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{self.path}: {n} problem{'s' if n != 1 else ''}, nothing was run"
        super().__init__("\n".join([head] + [f"  {p}" for p in self.problems]))


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestRow:
    """One slide of a manifest, paths resolved."""

    index: int  #: 0-based position among the data rows (``--task-index``)
    line: int  #: line number in the CSV file (the header is line 1)
    slide: Path
    points: Path
    stem: str
    mpp: float | None = None
    weights: Path | None = None
    bounds_offset: bool | None = None  #: None: the batch's --bounds-offset/--no-bounds-offset


@dataclass
class Manifest:
    """A validated manifest."""

    path: Path
    rows: list[ManifestRow]
    ignored_columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def by_stem(self) -> dict[str, ManifestRow]:
        return {r.stem: r for r in self.rows}


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else (base / p)


def _stem_problem(stem: str) -> str | None:
    if not stem:
        return "empty stem"
    if "/" in stem or "\\" in stem or stem in (".", ".."):
        return f"stem {stem!r} must be a plain file name (no / or \\)"
    if stem.startswith("."):
        return f"stem {stem!r} must not start with '.'"
    if any(ord(c) < 32 for c in stem):
        return f"stem {stem!r} holds control characters"
    if stem.lower() in RESERVED_STEMS:
        return f"stem {stem!r} is reserved (the batch summary uses it)"
    return None


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and check a manifest; every bad row is reported at once.

    Parameters
    ----------
    path : path-like
        The CSV file (UTF-8, a BOM is fine; blank lines and lines starting with ``#`` are skipped).
    check_files : bool
        Check that slides, click files and weights exist.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        Missing file or columns, no rows, or bad rows: missing files, duplicate stems (compared
        without case, as macOS and Windows file systems do), an um/px that is not a number in
        (0, 20], a stem that is not a plain file name, a bounds_offset that is not true/false.
        The message lists every problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(path, ["the manifest does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"cannot read it: {exc}"]) from None
    base = path.resolve().parent
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for cells in reader:
        if cells and any(c.strip() for c in cells) and not cells[0].lstrip().startswith("#"):
            header = [c.strip().lower() for c in cells]
            break
    if header is None:
        raise ManifestError(path, ["empty: expected a header line 'slide,points[,mpp,weights,stem]' and one row per slide"])
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    dupe_cols = sorted({c for c in header if c and header.count(c) > 1})
    if missing or dupe_cols:
        probs = []
        if missing:
            probs.append(f"line {reader.line_num}: missing column(s) {', '.join(missing)} "
                         f"(header is {', '.join(header)}; expected slide,points[,mpp,weights,stem])")
        if dupe_cols:
            probs.append(f"line {reader.line_num}: column(s) {', '.join(dupe_cols)} given twice")
        raise ManifestError(path, probs)
    ignored = [c for c in header if c not in MANIFEST_COLUMNS]
    col = {c: header.index(c) for c in MANIFEST_COLUMNS if c in header}

    problems: list[str] = []
    rows: list[ManifestRow] = []
    for cells in reader:
        line = reader.line_num
        if not cells or not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        get = {c: (cells[i].strip() if i < len(cells) else "") for c, i in col.items()}
        bad: list[str] = []
        slide_txt, points_txt = get["slide"], get["points"]
        slide = _resolve(base, slide_txt) if slide_txt else None
        points = _resolve(base, points_txt) if points_txt else None
        if slide is None:
            bad.append("slide is empty")
        elif check_files and not slide.exists():
            bad.append(f"slide not found: {slide}")
        if points is None:
            bad.append("points is empty")
        elif check_files and not points.is_file():
            bad.append(f"points file not found: {points}")
        mpp: float | None = None
        if get.get("mpp"):
            try:
                mpp = float(get["mpp"])
            except ValueError:
                bad.append(f"mpp {get['mpp']!r} is not a number (um/px)")
            else:
                if not (math.isfinite(mpp) and 0 < mpp <= MAX_MPP):
                    hint = " (that looks like a magnification; um/px at 40x is about 0.25)" if mpp > MAX_MPP else ""
                    bad.append(f"mpp {get['mpp']} is not an um/px in (0, {MAX_MPP:g}]{hint}")
                    mpp = None
        weights = _resolve(base, get["weights"]) if get.get("weights") else None
        bounds: bool | None = None
        if get.get("bounds_offset"):
            bounds = _BOOLS.get(get["bounds_offset"].lower())
            if bounds is None:
                bad.append(f"bounds_offset {get['bounds_offset']!r} is not true or false")
        if weights is not None and check_files and not weights.is_file():
            bad.append(f"weights file not found: {weights}")
        stem = get.get("stem") or (slide_stem(slide_txt) if slide_txt else "")
        sp = _stem_problem(stem)
        if sp and (slide_txt or get.get("stem")):
            bad.append(sp)
        label = f"line {line}" + (f" ({stem})" if stem else "")
        problems.extend(f"{label}: {b}" for b in bad)
        if not bad:
            rows.append(ManifestRow(index=-1, line=line, slide=slide, points=points, stem=stem, mpp=mpp, weights=weights,
                                    bounds_offset=bounds))
        else:
            rows.append(ManifestRow(index=-1, line=line, slide=slide or Path(), points=points or Path(), stem=stem))
    # duplicate stems (case-insensitive: outputs would overwrite each other on macOS/Windows shares)
    seen: dict[str, int] = {}
    for r in rows:
        if not r.stem:
            continue
        key = r.stem.lower()
        if key in seen:
            problems.append(f"line {r.line} ({r.stem}): stem also used on line {seen[key]}; "
                            "outputs would overwrite each other (set a 'stem' column)")
        else:
            seen[key] = r.line
    if not rows and not problems:
        problems.append("no rows: expected one row per slide after the header")
    if problems:
        problems.sort(key=lambda p: int(re.match(r"line (\d+)", p).group(1)) if re.match(r"line (\d+)", p) else 0)
        raise ManifestError(path, problems)
    rows = [dataclasses.replace(r, index=k) for k, r in enumerate(rows)]
    return Manifest(path=path, rows=rows, ignored_columns=ignored)


def write_manifest(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write manifest rows (dicts with slide, points and optional mpp, weights, stem) atomically.

    Paths under the manifest's folder are written relative to it, others absolute.
    """
    path = Path(path)
    base = path.resolve().parent
    cols = [c for c in MANIFEST_COLUMNS if any(r.get(c) not in (None, "") for r in rows) or c in REQUIRED_COLUMNS]

    def fmt(c: str, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if c in ("slide", "points", "weights"):
            p = Path(v).resolve()
            try:
                return p.relative_to(base).as_posix()
            except ValueError:
                return str(p)
        return str(v)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([fmt(c, r.get(c)) for c in cols])
    with atomic_output(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def select_rows(manifest: Manifest, *, only: Sequence[str] = (), task_index: int | None = None,
                rows_per_task: int = 1) -> list[ManifestRow]:
    """The rows one process handles: all, those named by ``only`` (stems), or array task ``task_index``.

    Task ``i`` handles rows ``[i * rows_per_task, (i + 1) * rows_per_task)`` (0-based).
    """
    rows = manifest.rows
    if only:
        stems = manifest.by_stem()
        unknown = [s for s in only if s not in stems]
        if unknown:
            raise NuclickError(f"{manifest.path}: no row with stem {', '.join(map(repr, unknown))}")
        wanted = set(only)
        rows = [r for r in rows if r.stem in wanted]
    if task_index is not None:
        if rows_per_task < 1:
            raise NuclickError("rows per task must be at least 1")
        n_tasks = math.ceil(len(rows) / rows_per_task)
        if not 0 <= task_index < n_tasks:
            raise NuclickError(f"task index {task_index} is out of range: {len(rows)} rows make tasks 0..{n_tasks - 1} "
                               f"(submit with sbatch --array=0-{n_tasks - 1})")
        rows = rows[task_index * rows_per_task:(task_index + 1) * rows_per_task]
    return rows


# --------------------------------------------------------------------------------------------------
# QuPath projects
# --------------------------------------------------------------------------------------------------


def _frame(image, path: Path) -> tuple[bool | None, float | None, str]:
    """The frame QuPath used for ``image`` (its bounds rule) and the project's um/px when the file has none."""
    from .qupath_project import bounds_rule
    from .slide import open_slide

    with open_slide(path, bounds_offset=True) as src:
        cropped, offset, file_mpp = (src.width, src.height), tuple(src.bounds_offset), src.mpp
    full = cropped
    if offset != (0, 0):
        with open_slide(path, bounds_offset=False) as src:
            full = (src.width, src.height)
    use, why = bounds_rule(image, cropped, full, offset)
    return use, (image.mpp if file_mpp is None else None), why


def manifest_from_qupath(project: str | os.PathLike, *, slide_dir: str | os.PathLike | None = None
                         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest rows for the images of a QuPath project that have exported clicks.

    The project is read by :func:`nuclick_wsi.qupath_project.read_project` (URIs, moved projects)
    and each image's clicks are found as ``nuclick-wsi qupath run`` finds them
    (``PROJECT/nuclick/clicks/<name>.geojson[.gz]``, from ``workflows/qupath/export_clicks.groovy``).

    Parameters
    ----------
    project : path-like
        ``project.qpproj`` or its folder.
    slide_dir : path-like, optional
        Look for every slide here by its file name instead of where the project says (a project
        made on a desktop, slides copied to a cluster).

    Returns
    -------
    rows : list of dict
        ``slide``, ``points``, ``stem``, ``bounds_offset``, ``mpp`` per image with clicks, in project
        order. The stem is the clicks file's name (so results import back with
        ``workflows/qupath/import_results.groovy``, as those of ``qupath run``). ``bounds_offset`` is
        QuPath's frame for the image (:func:`~nuclick_wsi.qupath_project.bounds_rule`; empty when
        the slide is not found here); ``mpp`` the project's um/px for slides whose file has none.
    notes : list of str
        Images left out or not fully resolved, and why.
    """
    from .qupath_project import read_project

    proj = read_project(project)
    twins: dict[str, int] = {}
    for image in proj.images:
        twins[image.file_name.lower()] = twins.get(image.file_name.lower(), 0) + 1
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for image in proj.images:
        clicks = proj.clicks_file(image)
        if clicks is None:
            notes.append(f"{image.name}: no clicks exported ({Path('nuclick', 'clicks', image.file_name + '.geojson')}); "
                         "left out")
            continue
        if twins[image.file_name.lower()] > 1:
            notes.append(f"{image.name}: another image has the file name {image.file_name!r}; rename one in QuPath; "
                         "left out")
            continue
        if slide_dir is not None and image.uri:
            from .qupath_project import _pure_path

            try:
                image.path, image.problem = Path(slide_dir) / _pure_path(image.uri).name, None
            except ValueError:
                pass
        if image.problem or image.path is None:
            notes.append(f"{image.name}: {image.problem or 'no slide'}; left out")
            continue
        row: dict[str, Any] = {"slide": image.path, "points": clicks, "stem": image.file_name}
        if _stem_problem(image.file_name):
            notes.append(f"{image.name}: {_stem_problem(image.file_name)}; left out")
            continue
        if not image.path.exists():
            notes.append(f"{image.name}: slide {image.path} not found here (--slide-dir if the slides moved); "
                         "frame not checked")
        else:
            try:
                row["bounds_offset"], row["mpp"], _why = _frame(image, image.path)
            except NuclickError as exc:
                notes.append(f"{image.name}: {str(exc).splitlines()[0]}; frame not checked")
        rows.append(row)
    return rows, notes


# --------------------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------------------

_HOST = socket.gethostname()


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux clock ticks since boot), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


class _Heartbeat:
    """One daemon thread per process refreshing the modification time of the locks it holds."""

    def __init__(self) -> None:
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


_HEARTBEAT = _Heartbeat()


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
    """

    _held_tokens: set[str] = set()

    def __init__(self, path: str | os.PathLike, stale_after: float = 600.0, heartbeat: float | None = None) -> None:
        self.path = Path(path)
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
        if info.host == _HOST:
            if info.pid == os.getpid():
                return info.token not in FileLock._held_tokens  # our pid, reused, from an older process
            if not _pid_alive(info.pid):
                return True
            start = _proc_start(info.pid)
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
        tmp = self.path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{self.path.name}")
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
        aside = self.path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{self.path.name}")
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
            info = {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid()), "time": time.time(),
                    "token": token}
            FileLock._held_tokens.add(token)
            if self._create((json.dumps(info) + "\n").encode()):
                self.token, self.touched, self.holder = token, time.time(), None
                _HEARTBEAT.add(self)
                return True
            FileLock._held_tokens.discard(token)
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
        _HEARTBEAT.remove(self)
        got = self._read()
        if got is not None:
            info = LockInfo.parse(got[0])
            if info is not None and info.token == self.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        FileLock._held_tokens.discard(self.token)
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
    """Every file name a slide's run may leave in the output folder (all formats, gzip or not)."""
    names = {p.name for gz in (False, True) for p in output_paths(".", stem, tuple(FORMATS), gz, glands=True).values()}
    return names | {f"{stem}{FAILED_SUFFIX}", f"{stem}{LOCK_SUFFIX}"}


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
        m = _TMP_RE.match(e.name)
        if m and m.group("name") in names:
            _remove(Path(e.path))
            removed.append(Path(e.path))
    return removed


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------


@dataclass
class SlideResult:
    """A row's state after a batch run."""

    row: ManifestRow
    status: str  #: one of :data:`STATUSES`
    clicks: int | None = None
    segmented: int | None = None
    seconds: float | None = None
    error: str = ""
    holder: str = ""  #: for ``running``: host:pid of the process holding the slide

    def as_summary_row(self) -> dict[str, Any]:
        skipped = None if self.clicks is None or self.segmented is None else self.clicks - self.segmented
        return {"stem": self.row.stem, "status": self.status, "clicks": self.clicks, "segmented": self.segmented,
                "skipped": skipped, "seconds": None if self.seconds is None else round(self.seconds, 2),
                "slide": str(self.row.slide), "points": str(self.row.points), "error": self.error}


@dataclass
class BatchResult:
    """Every manifest row's state (manifest order), and where the summary went."""

    results: list[SlideResult]
    selected: list[str]  #: stems this process was asked to handle
    summary_path: Path | None = None

    def count(self, status: str, selected_only: bool = False) -> int:
        sel = set(self.selected)
        return sum(r.status == status and (not selected_only or r.row.stem in sel) for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        """Failures among the rows this process handled."""
        sel = set(self.selected)
        return [r for r in self.results if r.status == "failed" and r.row.stem in sel]

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class BatchOptions:
    """Options of :func:`run_batch` (the ``batch`` command's flags)."""

    segment: SegmentOptions = field(default_factory=lambda: SegmentOptions(progress=False))
    weights: str | None = None  #: for rows without a ``weights`` column (None: the default model)
    gland_weights: str | None = None  #: gland model for rows whose files hold squiggles (none ships)
    only: Sequence[str] = ()
    task_index: int | None = None
    rows_per_task: int = 1
    stale_after: float = 600.0
    wait: bool = False  #: wait for rows another process is working on, instead of leaving them to it
    poll: float = 2.0
    slides_in_flight: int | None = None  #: None: 2 on CUDA (keeps the GPU busy across slides), else 1
    summary: bool = True


class _Models:
    """Each distinct checkpoint loaded once per process, with its predictor (thread-safe)."""

    def __init__(self, opts: BatchOptions, model=None) -> None:
        self.opts, self.fixed = opts, model
        self.cache: dict[str, Any] = {}
        self.guard = threading.Lock()

    def get(self, weights: Path | None):
        from .engine import Predictor
        from .models.weights import load_model

        key = str(weights) if weights is not None else (self.opts.weights or "")
        with self.guard:
            if key not in self.cache:
                try:
                    model = self.fixed if self.fixed is not None else load_model(key or None)
                    so = self.opts.segment
                    self.cache[key] = (model, Predictor(model, so.device, so.precision))
                except NuclickError as exc:
                    self.cache[key] = exc
            got = self.cache[key]
        if isinstance(got, Exception):
            raise got
        return got


def _totals(report: dict[str, Any] | None) -> tuple[int | None, int | None, float | None]:
    if not report:
        return None, None, None
    t = report.get("totals", {})
    return t.get("clicks"), t.get("segmented"), (report.get("timings_s") or {}).get("wall")


def row_complete(row: ManifestRow, paths: dict[str, Path], ngff: str | None = None) -> bool:
    """Outputs complete (label stores of NGFF ``ngff`` if given), and written after the slide and its
    clicks last changed (else: redo)."""
    if not outputs_complete(paths, ngff):
        return False
    try:
        done = paths["report"].stat().st_mtime
        return all(p.stat().st_mtime <= done for p in (row.slide, row.points))
    except OSError:
        return False


def disk_state(row: ManifestRow, out_dir: Path, opts: BatchOptions) -> SlideResult:
    """A row's state from what is in ``out_dir`` (complete, failed, running or pending)."""
    so = opts.segment
    paths = output_paths(out_dir, row.stem, so.formats, so.gzip)
    if row_complete(row, paths, so.ngff):
        return SlideResult(row, "complete", *_totals(_read_json(paths["report"])))
    holder = FileLock(out_dir / f"{row.stem}{LOCK_SUFFIX}", opts.stale_after).state()
    if holder is not False:
        return SlideResult(row, "running", holder=holder.describe() if holder else "")
    failed = _read_json(out_dir / f"{row.stem}{FAILED_SUFFIX}")
    if failed is not None:
        return SlideResult(row, "failed", error=str(failed.get("error", "")))
    return SlideResult(row, "pending")


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    return text if isinstance(exc, NuclickError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def process_row(row: ManifestRow, out_dir: Path, opts: BatchOptions, models: _Models) -> SlideResult:
    """Segment one row unless its outputs are complete or another process holds it."""
    lock = FileLock(out_dir / f"{row.stem}{LOCK_SUFFIX}", opts.stale_after)
    if not lock.acquire():
        return SlideResult(row, "running", holder=lock.holder.describe() if lock.holder else "")
    failed_path = out_dir / f"{row.stem}{FAILED_SUFFIX}"
    try:
        remove_temporaries(out_dir, stem_file_names(row.stem))
        so = opts.segment
        paths = output_paths(out_dir, row.stem, so.formats, so.gzip)
        if row_complete(row, paths, so.ngff):
            _remove(failed_path)
            return SlideResult(row, "complete", *_totals(_read_json(paths["report"])))
        t0 = time.perf_counter()
        try:
            model, predictor = models.get(row.weights)
            seg_opts = dataclasses.replace(so, mpp=row.mpp if row.mpp is not None else so.mpp,
                                           bounds_offset=so.bounds_offset if row.bounds_offset is None else row.bounds_offset)
            res = segment(row.slide, row.points, out_dir, options=seg_opts, model=model, predictor=predictor,
                          stem=row.stem, gland_weights=opts.gland_weights)
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the others
            record = {"stem": row.stem, "slide": str(row.slide), "points": str(row.points), "error": _one_line(exc),
                      "type": type(exc).__name__, "host": _HOST, "pid": os.getpid(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if not isinstance(exc, NuclickError):
                record["traceback"] = traceback.format_exc()
            with contextlib.suppress(OSError), atomic_output(failed_path) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            return SlideResult(row, "failed", seconds=time.perf_counter() - t0, error=record["error"])
        _remove(failed_path)
        clicks, segmented, _ = _totals(res.report)
        return SlideResult(row, "segmented", clicks, segmented, time.perf_counter() - t0)
    finally:
        lock.release()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SLURM sends SIGTERM before SIGKILL: turn it into KeyboardInterrupt so temporaries and locks go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _in_flight(opts: BatchOptions) -> int:
    if opts.slides_in_flight is not None:
        return max(1, int(opts.slides_in_flight))
    from .engine import resolve_device

    try:
        return 2 if resolve_device(opts.segment.device).type == "cuda" else 1
    except NuclickError:
        return 1


def run_batch(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike,
              options: BatchOptions | None = None, *, model=None,
              log: Callable[[str], None] | None = None) -> BatchResult:
    """Segment the manifest's rows (or those selected) into ``out_dir``; see the module docstring.

    Parameters
    ----------
    manifest : Manifest or path-like
        Read and checked with :func:`read_manifest` when a path (every bad row is reported before
        any work starts).
    out_dir : path-like
        Output folder, shared by every process working on the manifest.
    options : BatchOptions
    model : LoadedModel, optional
        Use this model for every row (tests, notebooks); default: load each row's weights once.
    log : callable, optional
        Called with one line per slide as it ends.

    Returns
    -------
    BatchResult
        ``ok`` is False when a slide this process handled failed.
    """
    opts = options or BatchOptions()
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = select_rows(man, only=opts.only, task_index=opts.task_index, rows_per_task=opts.rows_per_task)
    out = ensure_writable_dir(out_dir)
    models = _Models(opts, model)
    say = log or (lambda _m: None)
    done: dict[str, SlideResult] = {}
    n = len(rows)
    position = {r.stem: k + 1 for k, r in enumerate(rows)}

    def report(res: SlideResult) -> None:
        k = f"[{position[res.row.stem]}/{n}] {res.row.stem}"
        if res.status == "segmented":
            say(f"{k}: {res.segmented} of {res.clicks} clicks segmented in {res.seconds:.1f} s")
        elif res.status == "complete":
            say(f"{k}: outputs complete, skipped")
        elif res.status == "running":
            say(f"{k}: being segmented by {res.holder or 'another process'}, left to it")
        else:
            say(f"{k}: FAILED: {res.error}")

    def work(row: ManifestRow) -> SlideResult:
        res = process_row(row, out, opts, models)
        done[row.stem] = res
        report(res)
        return res

    with _sigterm_as_interrupt():
        todo = list(rows)
        while todo:
            k = _in_flight(opts) if len(todo) > 1 else 1
            if k == 1:
                for row in todo:
                    work(row)
            else:
                with ThreadPoolExecutor(max_workers=k, thread_name_prefix="nuclick-slide") as pool:
                    futures = [pool.submit(work, row) for row in todo]
                    try:
                        for f in futures:
                            f.result()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
            todo = [r for r in todo if done[r.stem].status == "running"] if opts.wait else []
            if todo:
                time.sleep(opts.poll)

    results = []
    for row in man.rows:
        res = done.get(row.stem)
        if res is None or res.status == "running":
            res = disk_state(row, out, opts)
        results.append(res)
    batch = BatchResult(results=results, selected=[r.stem for r in rows])
    if opts.summary:
        batch.summary_path = write_summary(out, results, stale_after=opts.stale_after)
    return batch


def summary_only(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike,
                 options: BatchOptions | None = None, *, write: bool = True) -> BatchResult:
    """Every row's state from the output folder, without running anything (and the summary file)."""
    opts = options or BatchOptions()
    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = select_rows(man, only=opts.only, task_index=opts.task_index, rows_per_task=opts.rows_per_task)
    out = Path(out_dir)
    results = [disk_state(r, out, opts) for r in man.rows]
    batch = BatchResult(results=results, selected=[r.stem for r in rows])
    if write and out.is_dir():
        batch.summary_path = write_summary(out, results, stale_after=opts.stale_after)
    return batch


def write_summary(out_dir: str | os.PathLike, results: Sequence[SlideResult], *, stale_after: float = 600.0) -> Path | None:
    """Write ``OUT/batch-summary.csv`` (atomically, under its own lock); None if the lock stayed busy."""
    out = Path(out_dir)
    final = out / SUMMARY_NAME
    lock = FileLock(out / f"{SUMMARY_NAME}{LOCK_SUFFIX}", stale_after)
    if not lock.acquire(timeout=60.0, poll=0.1):
        return None
    try:
        remove_temporaries(out, {SUMMARY_NAME, f"{SUMMARY_NAME}{LOCK_SUFFIX}"})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if v is None else v) for k, v in r.as_summary_row().items()})
        with atomic_output(final) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
    finally:
        lock.release()
    return final


def format_summary(results: Sequence[SlideResult], max_rows: int = 40) -> str:
    """A plain-text table of the results (only counts and the rows not done when there are many)."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    shown = list(results)
    note = ""
    if len(shown) > max_rows:
        shown = [r for r in results if r.status in ("failed", "running", "pending")][:max_rows]
        note = f"({len(results) - len(shown)} more rows not shown: see {SUMMARY_NAME})"
    cols = ("stem", "status", "clicks", "segmented", "seconds", "error")
    table = [cols] + [tuple("" if (v := r.as_summary_row()[c]) is None else str(v) for c in cols) for r in shown]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)).rstrip()
             for row in table]
    if note:
        lines.append(note)
    lines.append(", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "no rows")
    return "\n".join(lines)
