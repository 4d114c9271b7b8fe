"""Cohort manifests: read, check, select and write them; make one from a QuPath project.

The format: :mod:`nuclick_wsi.workflows.cohort`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.outputs.paths import slide_stem


MANIFEST_COLUMNS = ("slide", "points", "mpp", "weights", "stem", "bounds_offset")
REQUIRED_COLUMNS = ("slide", "points")
SUMMARY_NAME = "batch-summary.csv"
SUMMARY_COLUMNS = ("stem", "status", "clicks", "segmented", "skipped", "seconds", "slide", "points", "error")
RESERVED_STEMS = ("batch-summary", SUMMARY_NAME)
MAX_MPP = 20.0


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
    header = _read_header(reader, path)
    ignored = [c for c in header if c not in MANIFEST_COLUMNS]
    col = {c: header.index(c) for c in MANIFEST_COLUMNS if c in header}
    problems: list[str] = []
    rows: list[ManifestRow] = []
    for cells in reader:
        if not cells or not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        get = {c: (cells[i].strip() if i < len(cells) else "") for c, i in col.items()}
        row, bad = _parse_row(get, reader.line_num, base, check_files)
        label = f"line {row.line}" + (f" ({row.stem})" if row.stem else "")
        problems.extend(f"{label}: {b}" for b in bad)
        rows.append(row)
    problems += _duplicate_stems(rows)
    if not rows and not problems:
        problems.append("no rows: expected one row per slide after the header")
    if problems:
        problems.sort(key=lambda p: int(re.match(r"line (\d+)", p).group(1)) if re.match(r"line (\d+)", p) else 0)
        raise ManifestError(path, problems)
    rows = [dataclasses.replace(r, index=k) for k, r in enumerate(rows)]
    return Manifest(path=path, rows=rows, ignored_columns=ignored)


def _read_header(reader, path: Path) -> list[str]:
    """The header (lower case), after blank and comment lines; missing or repeated columns are errors."""
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
    return header


def _parse_mpp(text: str, bad: list[str]) -> float | None:
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        bad.append(f"mpp {text!r} is not a number (um/px)")
        return None
    if not (math.isfinite(mpp) and 0 < mpp <= MAX_MPP):
        hint = " (that looks like a magnification; um/px at 40x is about 0.25)" if mpp > MAX_MPP else ""
        bad.append(f"mpp {text} is not an um/px in (0, {MAX_MPP:g}]{hint}")
        return None
    return mpp


def _parse_row(get: dict[str, str], line: int, base: Path, check_files: bool) -> tuple[ManifestRow, list[str]]:
    """One row and its problems (a row with problems keeps only what names it in messages)."""
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
    mpp = _parse_mpp(get.get("mpp", ""), bad)
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
    if bad:
        return ManifestRow(index=-1, line=line, slide=slide or Path(), points=points or Path(), stem=stem), bad
    return ManifestRow(index=-1, line=line, slide=slide, points=points, stem=stem, mpp=mpp, weights=weights,
                       bounds_offset=bounds), bad


def _duplicate_stems(rows: list[ManifestRow]) -> list[str]:
    """Stems used twice (case-insensitive: outputs would overwrite each other on macOS/Windows shares)."""
    problems, seen = [], {}
    for r in rows:
        if not r.stem:
            continue
        key = r.stem.lower()
        if key in seen:
            problems.append(f"line {r.line} ({r.stem}): stem also used on line {seen[key]}; "
                            "outputs would overwrite each other (set a 'stem' column)")
        else:
            seen[key] = r.line
    return problems


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
    from nuclick_wsi.workflows.qupath_project.project import bounds_rule
    from nuclick_wsi.io.slides.registry import open_slide

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

    The project is read by :func:`nuclick_wsi.workflows.qupath_project.read_project` (URIs, moved projects)
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
        QuPath's frame for the image (:func:`~nuclick_wsi.workflows.qupath_project.bounds_rule`; empty when
        the slide is not found here); ``mpp`` the project's um/px for slides whose file has none.
    notes : list of str
        Images left out or not fully resolved, and why.
    """
    from nuclick_wsi.workflows.qupath_project.project import read_project

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
            from nuclick_wsi.workflows.qupath_project.project import pure_path

            try:
                image.path, image.problem = Path(slide_dir) / pure_path(image.uri).name, None
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

