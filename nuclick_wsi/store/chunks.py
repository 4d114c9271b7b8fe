"""Which chunk files a label store holds, and copying the unchanged ones from an earlier store.

Every chunk file a :class:`~nuclick_wsi.store.labels.LabelStore` writes (level 0 and pyramid) is
recorded in a :class:`ChunkTable`: its key (level, cy, cx), a digest of its decoded labels
(:func:`block_digest`) and the SHA-256 of its stored bytes. The rerun state keeps the table
(:mod:`nuclick_wsi.store.rerun`). A rerun that builds on an earlier run gives the new store the
earlier store's folder and table (:class:`EarlierStore`); then

* a level-0 chunk whose new labels have the earlier digest is copied as the earlier file's bytes
  (no zarr encoding), provided that file still has the recorded SHA-256;
* a pyramid chunk is copied without reading the level below when every chunk of that level it is
  made from has the earlier digest, or was absent both times, and its earlier file checks out; else
  it is computed, and then copied or encoded as a level-0 chunk;
* everything else is written as in a fresh store. The labels are always computed: a copy is only a
  shortcut, taken when its bytes are provably the ones encoding would give (same layout, same zarr
  and numcodecs versions, same labels), so the store's bytes are a fresh store's.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from nuclick_wsi.store import ngff

__all__ = ["ChunkLedger", "ChunkTable", "EarlierStore", "block_digest", "layout"]

Key = tuple[int, int, int]  #: (level, cy, cx)
COLUMNS = ["level", "cy", "cx", "digest", "sha256"]


def block_digest(block: np.ndarray) -> str:
    """BLAKE2b (128 bit) of a block's shape and its labels as little-endian uint32."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array(block.shape, "<i8").tobytes())
    h.update(np.ascontiguousarray(block, "<u4").data)
    return h.hexdigest()


def layout(version: str, chunk: int, height: int, width: int) -> dict[str, Any]:
    """What a chunk file's key and bytes depend on besides its labels (tables of another layout never mix)."""
    return {"ngff": version, "chunk": int(chunk), "shape": [int(height), int(width)],
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "codec": {k: repr(v) for k, v in sorted(ngff.array_options(version).items())}}


def chunk_file(root: Path, version: str, key: Key) -> Path:
    """Path of chunk ``key`` (level, cy, cx) in the store at ``root`` (layout of :mod:`~nuclick_wsi.store.ngff`)."""
    return root / ngff.chunk_key(version, *key)


@dataclass
class ChunkTable:
    """Per stored chunk file of a label store: (content digest, SHA-256 of the file), by (level, cy, cx)."""

    layout: dict[str, Any] = field(default_factory=dict)
    rows: dict[Key, tuple[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON types, rows sorted by key (the same table gives the same document)."""
        return {"layout": self.layout, "columns": COLUMNS,
                "rows": [[*key, *self.rows[key]] for key in sorted(self.rows)]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ChunkTable:
        """The table of :meth:`to_json`; ValueError for a malformed one."""
        if doc.get("columns") != COLUMNS or not isinstance(doc.get("layout"), dict):
            raise ValueError("chunk table without the expected columns or layout")
        rows: dict[Key, tuple[str, str]] = {}
        for row in doc["rows"]:
            level, cy, cx, digest, sha = row
            if not all(isinstance(v, int) and v >= 0 for v in (level, cy, cx)):
                raise ValueError(f"chunk table row {row!r}: bad key")
            if not (isinstance(digest, str) and isinstance(sha, str)):
                raise ValueError(f"chunk table row {row!r}: bad digests")
            rows[(level, cy, cx)] = (digest, sha)
        return cls(dict(doc["layout"]), rows)


@dataclass(frozen=True)
class EarlierStore:
    """An earlier run's label store folder and the chunk table its rerun state recorded."""

    path: Path
    table: ChunkTable


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class ChunkLedger:
    """The chunk table of a store being written, and the copies from an earlier store.

    Parameters
    ----------
    root : Path
        Folder of the store being written.
    version : str
        Its NGFF version (chunk key layout).
    layout : dict
        Its :func:`layout`.
    earlier : EarlierStore, optional
        Copy from this store where the labels are unchanged; ignored unless its layout is ``layout``.
    """

    def __init__(self, root: Path, version: str, layout: dict[str, Any], earlier: EarlierStore | None = None) -> None:
        self.root, self.version = root, version
        self.table = ChunkTable(dict(layout))
        self.earlier = earlier if earlier is not None and earlier.table.layout == layout else None
        self.copied = 0  #: chunk files copied from the earlier store
        self.written = 0  #: chunk files encoded (written by zarr)
        self._lock = threading.Lock()
        self._verified: set[Key] = set()  #: earlier files checked against their SHA-256 in this run

    def _earlier_digest(self, key: Key) -> str | None:
        row = self.earlier.table.rows.get(key) if self.earlier is not None else None
        return None if row is None else row[0]

    def copy(self, key: Key) -> bool:
        """Copy the earlier file of ``key`` if its bytes are the recorded ones (checked now, or by
        :meth:`earlier_intact` earlier in this run); True when copied, False when there is none or it
        is no longer the recorded file."""
        if self.earlier is None or key not in self.earlier.table.rows:
            return False
        digest, sha = self.earlier.table.rows[key]
        source = chunk_file(self.earlier.path, self.version, key)
        target = chunk_file(self.root, self.version, key)  # in a new store (a temporary folder)
        try:
            if key in self._verified:  # read and hashed once per run is enough
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            else:
                data = source.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha:
                    return False
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        except OSError:  # deleted, unreadable: encode instead
            return False
        with self._lock:
            self.table.rows[key] = (digest, sha)
            self.copied += 1
        return True

    def earlier_intact(self, level: int = 0) -> bool:
        """Whether every chunk file of ``level`` the earlier store recorded is still there, with its
        recorded bytes (False: no usable earlier store)."""
        if self.earlier is None:
            return False
        for key, (_, sha) in self.earlier.table.rows.items():
            if key[0] == level:
                if _sha256_file(chunk_file(self.earlier.path, self.version, key)) != sha:
                    return False
                self._verified.add(key)
        return True

    def _written(self, key: Key, digest: str) -> None:
        sha = _sha256_file(chunk_file(self.root, self.version, key))
        with self._lock:
            if sha is None:  # all zero: zarr stored nothing (and removed what was there)
                self.table.rows.pop(key, None)
                return
            self.table.rows[key] = (digest, sha)
            self.written += 1

    def put(self, key: Key, block: np.ndarray, encode: Callable[[], None]) -> None:
        """Store chunk ``key`` holding ``block``: the earlier file if the labels are the same, else ``encode()``."""
        digest = block_digest(block)
        if block.any() and digest == self._earlier_digest(key) and self.copy(key):
            return
        encode()
        self._written(key, digest)

    def unchanged(self, key: Key) -> bool:
        """Whether chunk ``key`` holds the earlier store's labels (or is absent in both)."""
        now = self.table.rows.get(key)
        return self.earlier is not None and (now[0] if now else None) == self._earlier_digest(key)

    def put_derived(self, key: Key, sources: list[Key], block_of: Callable[[], np.ndarray],
                    encode: Callable[[np.ndarray], None]) -> None:
        """Store a chunk made from ``sources`` (chunks of the level below): the earlier file, without
        computing it, if they all are unchanged; else ``block_of()``, stored as by :meth:`put`."""
        if all(self.unchanged(k) for k in sources) and self.copy(key):
            return
        block = block_of()
        self.put(key, block, lambda: encode(block))
