"""Tests of nuclick_wsi.store.chunks: a store written with an earlier store copies the chunk files whose
labels are unchanged, re-encodes the others, and holds the bytes of a store written from scratch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from nuclick_wsi.store import ngff
from nuclick_wsi.store.chunks import ChunkTable, EarlierStore, block_digest
from nuclick_wsi.store.labels import LabelStore, level_shapes

W, H, C = 300, 200, 32  # 10 x 7 chunks, 3 pyramid levels above level 0


def labels_of(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), np.uint32)
    for k in range(1, 40):
        y, x = rng.integers(0, H - 9), rng.integers(0, W - 9)
        labels[y:y + 9, x:x + 9] = k
    return labels


def write(path: Path, labels: np.ndarray, version: str, earlier: EarlierStore | None = None) -> LabelStore:
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.25, ngff_version=version, earlier=earlier)
    n_cy, n_cx = store.chunk_grid
    for cy in range(n_cy):
        for cx in range(n_cx):
            x0, y0, x1, y1 = store.chunk_bounds(cy, cx)
            if labels[y0:y1, x0:x1].any():
                store.write_chunk(cy, cx, labels[y0:y1, x0:x1])
    store.finalize([])
    return store


def files(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def chunk_files(path: Path, version: str) -> set[str]:
    """The relative paths of every chunk file (every level) of a store."""
    n = len(level_shapes(H, W, C))
    keys = {ngff.chunk_key(version, lv, cy, cx) for lv in range(n) for cy in range(H // C + 1) for cx in range(W // C + 1)}
    return {k for k in keys if (path / k).is_file()}


@pytest.fixture(params=["0.4", "0.5"])
def version(request):
    return request.param


def test_the_chunk_table_lists_every_chunk_file_with_its_labels_and_bytes(tmp_path, version):
    labels = labels_of()
    store = write(tmp_path / "a.zarr", labels, version)
    rows = store.chunk_table.rows
    assert {ngff.chunk_key(version, *k) for k in rows} == chunk_files(tmp_path / "a.zarr", version)
    for key, (digest, sha) in rows.items():
        assert hashlib.sha256((tmp_path / "a.zarr" / ngff.chunk_key(version, *key)).read_bytes()).hexdigest() == sha
    for level in (0, 1):  # level 1: level 0's [::2, ::2]
        image = labels[::2 ** level, ::2 ** level]
        for _, cy, cx in (k for k in rows if k[0] == level):
            assert rows[(level, cy, cx)][0] == block_digest(image[cy * C:(cy + 1) * C, cx * C:(cx + 1) * C])
    assert {k for k in rows if k[0] == 0} == {(0, cy, cx) for cy in range(7) for cx in range(10)
                                              if labels[cy * C:(cy + 1) * C, cx * C:(cx + 1) * C].any()}
    assert store.ledger.copied == 0 and store.ledger.written == len(rows)
    assert ChunkTable.from_json(store.chunk_table.to_json()) == store.chunk_table


def test_unchanged_chunks_are_copied_and_the_bytes_are_a_fresh_stores(tmp_path, version):
    old = labels_of()
    first = write(tmp_path / "a.zarr", old, version)
    new = old.copy()
    new[40:50, 100:105] = 99  # chunk (1, 3) only
    new[0:C, 0:C] = 0  # chunk (0, 0) now empty
    fresh = write(tmp_path / "fresh.zarr", new, version)
    again = write(tmp_path / "b.zarr", new, version, EarlierStore(tmp_path / "a.zarr", first.chunk_table))
    assert files(tmp_path / "b.zarr") == files(tmp_path / "fresh.zarr")
    assert again.chunk_table == fresh.chunk_table
    before, after = first.chunk_table.rows, again.chunk_table.rows
    changed = {k for k in after if before.get(k) != after[k]}
    # level 0 (1, 3), and above it (1, 0, 1), (2, 0, 0), (3, 0, 0); (0, 0, 0) and its pyramid went or changed
    assert {k for k in changed if k[0] == 0} == {(0, 1, 3)}
    assert again.ledger.written == len(changed) and again.ledger.copied == len(after) - len(changed)
    assert again.ledger.copied > 10 and (0, 0, 0) in before and (0, 0, 0) not in after


@pytest.mark.parametrize("damage", ["altered", "truncated", "deleted"])
def test_an_altered_or_deleted_earlier_chunk_is_encoded_again_not_copied(tmp_path, version, damage):
    labels = labels_of()
    first = write(tmp_path / "a.zarr", labels, version)
    level0 = sorted(k for k in first.chunk_table.rows if k[0] == 0)
    spoilt = [level0[3], max(k for k in first.chunk_table.rows if k[0] == 1)]  # a level-0 and a pyramid chunk
    for key in spoilt:
        path = tmp_path / "a.zarr" / ngff.chunk_key(version, *key)
        data = bytearray(path.read_bytes())
        if damage == "altered":
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))
        elif damage == "truncated":
            path.write_bytes(bytes(data[:-3]))
        else:
            path.unlink()
    write(tmp_path / "fresh.zarr", labels, version)
    again = write(tmp_path / "b.zarr", labels, version, EarlierStore(tmp_path / "a.zarr", first.chunk_table))
    assert files(tmp_path / "b.zarr") == files(tmp_path / "fresh.zarr")
    assert again.ledger.written == len(spoilt) and again.ledger.copied == len(first.chunk_table.rows) - len(spoilt)


def test_an_earlier_store_of_another_layout_is_not_copied_from(tmp_path):
    labels = labels_of()
    first = write(tmp_path / "a.zarr", labels, "0.4")
    table = ChunkTable(dict(first.chunk_table.layout, ngff="0.5"), first.chunk_table.rows)
    again = write(tmp_path / "b.zarr", labels, "0.5", EarlierStore(tmp_path / "a.zarr", table))
    assert again.ledger.copied == 0 and again.ledger.written == len(first.chunk_table.rows)
    other = ChunkTable(dict(first.chunk_table.layout, zarr="0.0.0"), first.chunk_table.rows)
    again = write(tmp_path / "c.zarr", labels, "0.4", EarlierStore(tmp_path / "a.zarr", other))
    assert again.ledger.copied == 0
    assert files(tmp_path / "c.zarr") == files(tmp_path / "a.zarr")


def test_a_chunk_written_again_as_all_zero_leaves_the_table(tmp_path):
    store = LabelStore.create(tmp_path / "a.zarr", W, H, chunk=C, mpp=None)
    store.write_chunk(1, 2, np.full((C, C), 5, np.uint32))
    assert set(store.chunk_table.rows) == {(0, 1, 2)}
    store.write_chunk(1, 2, np.zeros((C, C), np.uint32))  # zarr removes the chunk file
    assert store.chunk_table.rows == {} and not (tmp_path / "a.zarr" / "0" / "1" / "2").exists()


def test_a_chunk_another_process_wrote_is_not_mistaken_for_an_unchanged_one(tmp_path, version):
    """A chunk written through LabelStore.open (another writer) is not in this store's ledger: the
    pyramid above it is computed, not copied from the earlier store, and equals a fresh store's."""
    c, w, h = 32, 256, 256
    same, new = np.full((c, c), 7, np.uint32), np.full((c, c), 9, np.uint32)
    a = LabelStore.create(tmp_path / "a.zarr", w, h, chunk=c, mpp=None, ngff_version=version)
    a.write_chunk(0, 0, same)
    a.finalize([])
    b = LabelStore.create(tmp_path / "b.zarr", w, h, chunk=c, mpp=None, ngff_version=version,
                          earlier=EarlierStore(tmp_path / "a.zarr", a.chunk_table))
    b.write_chunk(0, 0, same)
    LabelStore.open(tmp_path / "b.zarr").write_chunk(0, 1, new)  # where the earlier store had nothing
    b.finalize([])
    fresh = LabelStore.create(tmp_path / "f.zarr", w, h, chunk=c, mpp=None, ngff_version=version)
    fresh.write_chunk(0, 0, same)
    fresh.write_chunk(0, 1, new)
    fresh.finalize([])
    assert files(tmp_path / "b.zarr") == files(tmp_path / "f.zarr")
    assert b.ledger.copied >= 1  # level 0's unchanged chunk was still copied
