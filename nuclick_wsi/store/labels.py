"""The zarr label store: uint32 instance ids as an OME-NGFF label image (0.4 zarr v2, or 0.5 zarr v3).

Layout chosen: the store root *is* the label image, so napari (napari-ome-zarr) opens it directly
as a Labels layer::

    slide.labels.zarr/
      .zgroup
      .zattrs          multiscales (0.4) + image-label (0.4) + "nuclick-wsi" (our own keys)
      0/               level 0: uint32 (height, width), chunks (chunk, chunk), Blosc zstd, "/" keys
      1/, 2/, ...      nearest-neighbour pyramid, each level 2x smaller, down to one chunk
      instances.csv    the instance table (label, prompt_index, class_name, click x/y, centroid, ...)

That is NGFF 0.4 (the default; QuPath 0.6 reads it); ``ngff="0.5"`` writes the same tree in the
zarr v3 format (``zarr.json`` files, metadata under ``ome``; see :mod:`nuclick_wsi.store.ngff`).
Level-0 pixel ``[y, x]`` is the label of level-0 slide pixel (x, y) in QuPath's frame; 0 is
background. ``image-label.source`` is written only when the caller names a real source image.

Writing: :meth:`LabelStore.create` on a temporary path (from ``atomic_output``), then
:meth:`~LabelStore.write_chunk` for each non-empty chunk (several processes may each open the
store with :meth:`LabelStore.open` and write different chunks), then
:meth:`~LabelStore.finalize` (pyramid, instance table, metadata written last), ``close()``, and
let ``atomic_output`` rename the folder. :func:`is_complete` tells a finished store from an
interrupted one. A store created with an ``earlier`` store copies the chunk files whose labels that
one already holds (:mod:`nuclick_wsi.store.chunks`).
"""

from __future__ import annotations

from nuclick_wsi.errors import OutputError
from nuclick_wsi.store import ngff
from nuclick_wsi.store.chunks import ChunkLedger, ChunkTable, EarlierStore, layout
from nuclick_wsi.store.instances import INSTANCE_COLUMNS, INSTANCE_TABLE_NAME, write_instance_table

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc as _blosc


__all__ = [
    "LabelStore",
    "is_complete",
    "level_shapes",
    "open_labels",
    "stored_chunks",
]

_OUR_KEY = "nuclick-wsi"
_DTYPE = np.uint32


def level_shapes(height: int, width: int, chunk: int) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels: halved (rounding up) until a level fits in one chunk.

    Parameters
    ----------
    height, width : int
        Level-0 shape.
    chunk : int
        Chunk edge length.

    Returns
    -------
    list of (int, int)
        ``(height, width)`` of levels 0, 1, ...; level k is ``ceil(level0 / 2**k)``.
    """
    shapes = [(int(height), int(width))]
    while shapes[-1][0] > chunk or shapes[-1][1] > chunk:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


# Blosc's own threads store a chunk's blocks in the order they finish, so the same labels would
# compress to different bytes run to run; single-threaded Blosc is deterministic (reruns and
# batch/Snakemake runs give byte-identical chunks), and label chunks compress fast on one thread.
_blosc.use_threads = False


def _create_level(group: zarr.Group, level: int, shape: tuple[int, int], chunk: int, version: str) -> zarr.Array:
    return group.create_array(
        str(level), shape=shape, chunks=(chunk, chunk), dtype=_DTYPE, fill_value=0, overwrite=True,
        config={"write_empty_chunks": False}, **ngff.array_options(version),
    )


def _stored_chunks(root: Path, level: int, version: str) -> set[tuple[int, int]]:
    """Indices (cy, cx) of the chunks of one level that exist on disk (keys ``level[/c]/cy/cx``)."""
    found: set[tuple[int, int]] = set()
    folder = root / str(level) / ngff.chunk_prefix(version)
    if not folder.is_dir():
        return found
    for row in os.scandir(folder):
        if row.is_dir() and row.name.isdigit():
            found.update((int(row.name), int(col.name)) for col in os.scandir(row.path) if col.name.isdigit())
    return found


def stored_chunks(path: str | os.PathLike, level: int = 0) -> set[tuple[int, int]]:
    """Indices (cy, cx) of the chunks of a store's level that hold labels (the others are all 0)."""
    root = Path(path)
    version = next((v for v in ngff.NGFF_VERSIONS if (root / ngff.metadata_file(v)).is_file()), ngff.DEFAULT_NGFF)
    return _stored_chunks(root, level, version)


def _chunk_slices(cy: int, cx: int, chunk: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    ys = slice(cy * chunk, min((cy + 1) * chunk, shape[0]))
    xs = slice(cx * chunk, min((cx + 1) * chunk, shape[1]))
    return ys, xs


def _downsampled(src: zarr.Array, ys: slice, xs: slice) -> np.ndarray:
    """The pyramid chunk over (ys, xs) of the level above ``src``: ``src[::2, ::2]`` of the 2 x 2 chunks it covers."""
    return np.ascontiguousarray(src[2 * ys.start : 2 * ys.stop, 2 * xs.start : 2 * xs.stop][::2, ::2])


def _as_labels(block: np.ndarray) -> np.ndarray:
    """``block`` as uint32, refusing values that do not fit (negative or above 2**32 - 1)."""
    block = np.asarray(block)
    if block.dtype.kind not in "biu":
        raise ValueError(f"labels must be integers, got dtype {block.dtype}")
    if block.dtype.kind != "b" and block.size and (block.min() < 0 or block.max() > np.iinfo(_DTYPE).max):
        raise ValueError("labels must lie in 0 .. 2**32 - 1")
    return block.astype(_DTYPE, copy=False)


class LabelStore:
    """A zarr label store being written: level-0 chunks, then pyramid, table and metadata.

    Use :meth:`create` for a new store and :meth:`open` to add chunks to an existing one (another
    process); the constructor is internal.
    """

    def __init__(self, path: Path, group: zarr.Group, earlier: EarlierStore | None = None) -> None:
        self.path = path
        self._group = group
        ours = group.attrs[_OUR_KEY]
        self.name: str = ours["name"]
        self.mpp: float | None = ours["mpp"]
        self.chunk: int = int(ours["chunk"])
        self.source_image: str | None = ours.get("source_image")
        self.ngff: str = ours.get("ngff", ngff.DEFAULT_NGFF)
        self.level0: zarr.Array = zarr.open_array(group.store, path="0", mode="r+", config={"write_empty_chunks": False})
        self.height, self.width = self.level0.shape
        #: the chunk files written through this object (level 0 and pyramid), and the copies from ``earlier``
        self.ledger = ChunkLedger(path, self.ngff, layout(self.ngff, self.chunk, self.height, self.width), earlier)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        width: int,
        height: int,
        *,
        chunk: int = 1024,
        name: str = "nuclei",
        mpp: float | None,
        source_image: str | None = None,
        ngff_version: str = ngff.DEFAULT_NGFF,
        earlier: EarlierStore | None = None,
    ) -> LabelStore:
        """Create a new, empty store at ``path`` (which must not hold a zarr group or array).

        Parameters
        ----------
        path : path-like
            Folder of the store; normally a temporary path from ``atomic_output``.
        width, height : int
            Level-0 size in pixels (the slide's level-0 size in QuPath's frame).
        chunk : int
            Chunk edge length of every level.
        name : str
            Name of the label image (``multiscales[0].name``).
        mpp : float or None
            Level-0 micrometres per pixel; None writes pixel units (no ``unit`` on the axes).
        source_image : str, optional
            ``image-label.source.image``: relative path to the image these labels belong to (none
            by default: the store is a label image on its own).
        ngff_version : {"0.4", "0.5"}
            "0.4": OME-NGFF 0.4 in the zarr v2 format; "0.5": OME-NGFF 0.5 in zarr v3.
        earlier : EarlierStore, optional
            An earlier store of the same layout and its chunk table: chunks whose labels it already
            holds are copied from it (see :mod:`nuclick_wsi.store.chunks`); the bytes are the same.

        Returns
        -------
        LabelStore
        """
        if width <= 0 or height <= 0 or chunk <= 0:
            raise ValueError(f"width, height and chunk must be positive, got {width}, {height}, {chunk}")
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number or None, got {mpp}")
        path = Path(path)
        fmt = ngff.zarr_format(ngff_version)
        try:
            group = zarr.open_group(str(path), mode="w-", zarr_format=fmt)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError) as exc:
            raise OutputError(f"{path} already holds a zarr store") from exc
        except OSError as exc:
            raise OutputError(f"cannot create label store {path}: {exc.strerror or exc}") from exc
        group.attrs[_OUR_KEY] = {
            "name": name,
            "mpp": None if mpp is None else float(mpp),
            "chunk": int(chunk),
            "source_image": source_image,
            "ngff": ngff_version,
        }
        _create_level(group, 0, (int(height), int(width)), int(chunk), ngff_version)
        return cls(path, group, earlier)

    @classmethod
    def open(cls, path: str | os.PathLike) -> LabelStore:
        """Open a store made by :meth:`create` to write more chunks or finalize it."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="r+")
        except (zarr.errors.GroupNotFoundError, FileNotFoundError) as exc:
            raise OutputError(f"{path} is not a nuclick-wsi label store") from exc
        if _OUR_KEY not in group.attrs or "0" not in group:
            raise OutputError(f"{path} is not a nuclick-wsi label store")
        return cls(path, group)

    @property
    def chunk_grid(self) -> tuple[int, int]:
        """Number of level-0 chunks along y and x."""
        return math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk)

    def chunk_bounds(self, cy: int, cx: int) -> tuple[int, int, int, int]:
        """Level-0 pixel box ``(x0, y0, x1, y1)`` (end exclusive) of chunk (cy, cx)."""
        ys, xs = _chunk_slices(cy, cx, self.chunk, (self.height, self.width))
        return xs.start, ys.start, xs.stop, ys.stop

    def write_chunk(self, cy: int, cx: int, block: np.ndarray) -> None:
        """Write one whole level-0 chunk.

        Parameters
        ----------
        cy, cx : int
            Chunk index (row, column).
        block : ndarray of integers
            The chunk's labels, shape ``(y1 - y0, x1 - x0)`` of :meth:`chunk_bounds` (edge chunks
            are smaller). An all-zero block stores nothing (and removes a chunk stored before).
        """
        n_cy, n_cx = self.chunk_grid
        if not (0 <= cy < n_cy and 0 <= cx < n_cx):
            raise IndexError(f"chunk ({cy}, {cx}) outside the {n_cy} x {n_cx} grid")
        x0, y0, x1, y1 = self.chunk_bounds(cy, cx)
        block = _as_labels(block)
        if block.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"chunk ({cy}, {cx}) must have shape {(y1 - y0, x1 - x0)}, got {block.shape}")
        self.ledger.put((0, cy, cx), block, lambda: self.level0.__setitem__((slice(y0, y1), slice(x0, x1)), block))

    def copy_chunk(self, cy: int, cx: int) -> bool:
        """Take level-0 chunk (cy, cx) from the earlier store as it is (the caller knows its labels are
        unchanged); False when that store has no such chunk or its file is not the recorded one."""
        return self.ledger.copy((0, cy, cx))

    @property
    def chunk_table(self) -> ChunkTable:
        """Every chunk file written through this object (a store written by several processes: each one's)."""
        return self.ledger.table

    def finalize(
        self,
        instance_table: Iterable[Mapping[str, Any]] | Any,
        *,
        colors: Mapping[int, Sequence[int]] | None = None,
        workers: int = 1,
    ) -> None:
        """Build the pyramid, write the instance table, then the OME-NGFF metadata.

        Parameters
        ----------
        instance_table : iterable of mappings, or pandas DataFrame
            One row per instance with keys among :data:`INSTANCE_COLUMNS` (see
            :func:`write_instance_table`).
        colors : mapping of int to (r, g, b) or (r, g, b, a), optional
            Display colours (0-255) per label value, written as ``image-label.colors``.
        workers : int
            Threads used to build the pyramid.

        Notes
        -----
        Each pyramid chunk is made from the at most 2 x 2 chunks of the level below that it covers
        (``[::2, ::2]``), and only where those hold data, so memory stays at a few chunks and the
        time follows the labelled area. The metadata are written last: a store without them is
        incomplete (:func:`is_complete`).
        """
        shapes = level_shapes(self.height, self.width, self.chunk)
        for level in range(1, len(shapes)):
            self._build_level(level, shapes[level], workers)
        write_instance_table(self.path / INSTANCE_TABLE_NAME, instance_table)
        attrs = dict(self._group.attrs.asdict())
        attrs.update(ngff.ngff_attrs(self.ngff, name=self.name, mpp=self.mpp, n_levels=len(shapes), colors=colors,
                                     source_image=self.source_image))
        self._group.attrs.put(attrs)

    def _build_level(self, level: int, shape: tuple[int, int], workers: int) -> None:
        src = self._group[str(level - 1)]
        dst = _create_level(self._group, level, shape, self.chunk, self.ngff)
        stored = _stored_chunks(self.path, level - 1, self.ngff)
        targets = sorted({(cy // 2, cx // 2) for cy, cx in stored})
        # the ledger knows the level below only if this object wrote all of it (not another process via open())
        known = stored == {(cy, cx) for lv, cy, cx in self.ledger.table.rows if lv == level - 1}

        def one(index: tuple[int, int]) -> None:
            cy, cx = index
            ys, xs = _chunk_slices(cy, cx, self.chunk, shape)
            below = [(level - 1, 2 * cy + dy, 2 * cx + dx) for dy in (0, 1) for dx in (0, 1)]
            key, write = (level, cy, cx), (lambda block: dst.__setitem__((ys, xs), block))
            if known:
                self.ledger.put_derived(key, below, lambda: _downsampled(src, ys, xs), write)
            else:  # judged by its computed labels only
                block = _downsampled(src, ys, xs)
                self.ledger.put(key, block, lambda: write(block))

        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(one, targets))
        else:
            for index in targets:
                one(index)

    def close(self) -> None:
        """Release the store (a directory store holds no open handles; kept for symmetry)."""
        self._group = None  # type: ignore[assignment]

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_labels(path: str | os.PathLike) -> zarr.Array:
    """Level 0 of a label store, read-only.

    Parameters
    ----------
    path : path-like
        Folder of the store.

    Returns
    -------
    zarr.Array
        uint32, shape (height, width); ``a[y, x]`` is the label of level-0 pixel (x, y).
    """
    path = Path(path)
    try:
        return zarr.open_array(str(path), path="0", mode="r")
    except (zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError, FileNotFoundError) as exc:
        raise OutputError(f"{path} is not a label store (no level 0)") from exc


def _levels_ok(group: zarr.Group, datasets: list[dict[str, Any]]) -> bool:
    level0 = group["0"]
    chunk = level0.chunks[0]
    expected = level_shapes(level0.shape[0], level0.shape[1], chunk)
    if [d.get("path") for d in datasets] != [str(k) for k in range(len(expected))]:
        return False
    for k, shape in enumerate(expected):
        if str(k) not in group or group[str(k)].shape != shape:
            return False
    return True


def is_complete(path: str | os.PathLike, ngff_version: str | None = None) -> bool:
    """Whether a label store was finalized: metadata, every pyramid level and the table present.

    Parameters
    ----------
    path : path-like
        Folder of the store.
    ngff_version : {"0.4", "0.5"}, optional
        Only a store of this NGFF version counts (a store of the other version is to be redone).

    Returns
    -------
    bool
        False for a missing, foreign, unfinished or damaged store; never raises for those.
    """
    path = Path(path)
    if not any((path / ngff.metadata_file(v)).is_file() for v in ngff.NGFF_VERSIONS):
        return False
    if not (path / INSTANCE_TABLE_NAME).is_file():
        return False
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = group.attrs.asdict()
        found = ngff.read_ngff(attrs)
        if found is None or found[0] != attrs[_OUR_KEY].get("ngff", ngff.DEFAULT_NGFF):
            return False
        if ngff_version is not None and found[0] != ngff_version:
            return False
        if ngff.zarr_format(found[0]) != group.metadata.zarr_format:
            return False
        if not _levels_ok(group, found[1][0].get("datasets") or []):
            return False
        with open(path / INSTANCE_TABLE_NAME, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        return tuple(header) == INSTANCE_COLUMNS
    except Exception:  # noqa: BLE001 - any damage means "not complete"
        return False
