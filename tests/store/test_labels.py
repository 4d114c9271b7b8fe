"""Tests of nuclick_wsi.store.labels: the OME-NGFF 0.4 zarr label store and its instance table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.errors import OutputError
from nuclick_wsi.store.instances import INSTANCE_COLUMNS, read_instance_table, write_instance_table
from nuclick_wsi.store.labels import LabelStore, is_complete, level_shapes, open_labels

W, H, C = 300, 200, 64  # 5 x 4 chunks of 64 px, edge chunks smaller

ROWS = [
    {
        "label": 1, "prompt_index": 0, "class_name": "tumor", "x": 10.5, "y": 20.5,
        "centroid_x": 10.25, "centroid_y": 21.0, "area_px": 57.0, "area_um2": 3.5625,
        "score": 0.9137, "kind": "nucleus",
    },
    {
        "label": 2, "prompt_index": 5, "class_name": None, "x": 0.1 + 0.2, "y": 1e-7,
        "centroid_x": 3.0, "centroid_y": 4.0, "area_px": 12.0, "area_um2": None,
        "score": 0.5, "kind": "gland",
    },
]


def _fill(store: LabelStore, labels: np.ndarray) -> None:
    n_cy, n_cx = store.chunk_grid
    for cy in range(n_cy):
        for cx in range(n_cx):
            x0, y0, x1, y1 = store.chunk_bounds(cy, cx)
            block = labels[y0:y1, x0:x1]
            if block.any():
                store.write_chunk(cy, cx, block)


def _sparse_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), dtype=np.uint32)
    labels[10:50, 20:90] = rng.integers(0, 1000, (40, 70))  # chunks (0,0), (0,1)
    labels[150:200, 250:300] = 7  # the corner edge chunk (3, 4)
    return labels


def _round_trip(rows, path):
    write_instance_table(path, rows)
    return read_instance_table(path)


@pytest.fixture()
def finalized(tmp_path):
    path = tmp_path / "s.zarr"
    labels = _sparse_labels()
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.25)
    _fill(store, labels)
    store.finalize(ROWS, colors={1: (255, 0, 0), 2: (0, 255, 0, 128)})
    store.close()
    return path, labels


def test_create_level0_array(tmp_path):
    path = tmp_path / "s.zarr"
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.5)
    assert (store.width, store.height, store.chunk, store.mpp, store.name) == (W, H, C, 0.5, "nuclei")
    assert store.chunk_grid == (4, 5)
    zarray = json.loads((path / "0" / ".zarray").read_text())
    assert zarray["shape"] == [H, W]
    assert zarray["chunks"] == [C, C]
    assert zarray["dtype"] == "<u4"
    assert zarray["fill_value"] == 0
    assert zarray["dimension_separator"] == "/"
    assert zarray["compressor"]["id"] == "blosc"
    assert zarray["compressor"]["cname"] == "zstd"
    assert (path / ".zgroup").is_file()


def test_create_refuses_existing_store_and_bad_arguments(tmp_path):
    path = tmp_path / "s.zarr"
    LabelStore.create(path, W, H, chunk=C, mpp=None)
    with pytest.raises(OutputError):
        LabelStore.create(path, W, H, chunk=C, mpp=None)
    with pytest.raises(ValueError):
        LabelStore.create(tmp_path / "t.zarr", W, H, mpp=-1.0)
    with pytest.raises(ValueError):
        LabelStore.create(tmp_path / "u.zarr", 0, H, mpp=None)


def test_chunk_bounds_and_edge_chunks(tmp_path):
    store = LabelStore.create(tmp_path / "s.zarr", W, H, chunk=C, mpp=None)
    assert store.chunk_bounds(0, 0) == (0, 0, 64, 64)
    assert store.chunk_bounds(3, 4) == (256, 192, 300, 200)
    store.write_chunk(3, 4, np.full((8, 44), 3, dtype=np.uint16))
    assert (open_labels(store.path)[192:200, 256:300] == 3).all()


def test_write_chunk_validates(tmp_path):
    store = LabelStore.create(tmp_path / "s.zarr", W, H, chunk=C, mpp=None)
    with pytest.raises(ValueError):
        store.write_chunk(0, 0, np.ones((C, C - 1), dtype=np.uint32))
    with pytest.raises(IndexError):
        store.write_chunk(4, 0, np.ones((C, C), dtype=np.uint32))
    with pytest.raises(ValueError):
        store.write_chunk(0, 0, -np.ones((C, C), dtype=np.int32))
    with pytest.raises(ValueError):
        store.write_chunk(0, 0, np.ones((C, C), dtype=np.float32))


def test_only_non_empty_chunks_are_stored(tmp_path):
    store = LabelStore.create(tmp_path / "s.zarr", W, H, chunk=C, mpp=None)
    block = np.zeros((C, C), dtype=np.uint32)
    store.write_chunk(1, 1, block)
    assert not (store.path / "0" / "1" / "1").exists()
    block[5, 6] = 42
    store.write_chunk(1, 1, block)
    assert (store.path / "0" / "1" / "1").is_file()
    assert open_labels(store.path)[C + 5, C + 6] == 42


def test_writers_with_separate_handles(tmp_path):
    """Workers open the store themselves and each writes its own chunks."""
    path = tmp_path / "s.zarr"
    labels = _sparse_labels(1)
    LabelStore.create(path, W, H, chunk=C, mpp=0.25)
    for worker in range(2):
        store = LabelStore.open(path)
        for cy in range(worker, 4, 2):
            for cx in range(5):
                x0, y0, x1, y1 = store.chunk_bounds(cy, cx)
                store.write_chunk(cy, cx, labels[y0:y1, x0:x1])
    np.testing.assert_array_equal(open_labels(path)[:], labels)
    with pytest.raises(OutputError):
        LabelStore.open(tmp_path / "missing.zarr")


def test_level_shapes():
    assert level_shapes(200, 300, 64) == [(200, 300), (100, 150), (50, 75), (25, 38)]
    assert level_shapes(64, 64, 64) == [(64, 64)]
    assert level_shapes(65, 10, 64) == [(65, 10), (33, 5)]


@pytest.mark.parametrize("workers", [1, 2])
def test_pyramid_is_exact_nearest_neighbour(tmp_path, workers):
    path = tmp_path / "s.zarr"
    labels = _sparse_labels()
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.25)
    _fill(store, labels)
    store.finalize([], workers=workers)
    group = zarr.open_group(str(path), mode="r")
    shapes = level_shapes(H, W, C)
    assert len(shapes) == 4
    for k, shape in enumerate(shapes):
        level = group[str(k)]
        assert level.shape == shape
        assert level.chunks == (C, C)
        assert level.dtype == np.uint32
        np.testing.assert_array_equal(level[:], labels[:: 2**k, :: 2**k])


def test_pyramid_of_dense_labels(tmp_path):
    path = tmp_path / "s.zarr"
    labels = np.random.default_rng(5).integers(1, 2**32 - 1, (H, W), dtype=np.uint32)
    store = LabelStore.create(path, W, H, chunk=C, mpp=None)
    _fill(store, labels)
    store.finalize([])
    group = zarr.open_group(str(path), mode="r")
    for k in range(4):
        np.testing.assert_array_equal(group[str(k)][:], labels[:: 2**k, :: 2**k])


def test_pyramid_stores_only_chunks_with_data(finalized):
    path, labels = finalized
    for k, level in enumerate(level_shapes(H, W, C)[1:], start=1):
        ref = labels[:: 2**k, :: 2**k]
        expected = {
            f"{cy}/{cx}"
            for cy in range(-(-level[0] // C))
            for cx in range(-(-level[1] // C))
            if ref[cy * C : (cy + 1) * C, cx * C : (cx + 1) * C].any()
        }
        stored = {p.relative_to(path / str(k)).as_posix() for p in (path / str(k)).glob("*/*")}
        assert stored == expected
    assert len(list((path / "1").glob("*/*"))) < 6  # of 2 x 3 chunks


def test_single_chunk_store_has_one_level(tmp_path):
    path = tmp_path / "s.zarr"
    store = LabelStore.create(path, 50, 40, chunk=64, mpp=0.5)
    store.write_chunk(0, 0, np.ones((40, 50), dtype=np.uint32))
    store.finalize([])
    attrs = json.loads((path / ".zattrs").read_text())
    assert [d["path"] for d in attrs["multiscales"][0]["datasets"]] == ["0"]
    assert is_complete(path)


def test_ngff_metadata_with_mpp(finalized):
    path, _ = finalized
    attrs = json.loads((path / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["name"] == "nuclei"
    assert ms["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    for k, d in enumerate(ms["datasets"]):
        assert d["coordinateTransformations"] == [{"type": "scale", "scale": [0.25 * 2**k, 0.25 * 2**k]}]
    label = attrs["image-label"]
    assert label["version"] == "0.4"
    assert "source" not in label  # the store is the label image: no parent image to point at
    assert label["colors"] == [
        {"label-value": 1, "rgba": [255, 0, 0, 255]},
        {"label-value": 2, "rgba": [0, 255, 0, 128]},
    ]


def test_ngff_metadata_without_mpp(tmp_path):
    path = tmp_path / "s.zarr"
    store = LabelStore.create(path, W, H, chunk=C, mpp=None, name="glands")
    store.finalize([])
    attrs = json.loads((path / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["name"] == "glands"
    assert all("unit" not in a for a in ms["axes"])
    assert [a["type"] for a in ms["axes"]] == ["space", "space"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]]
    assert "colors" not in attrs["image-label"]


def test_instance_table_round_trip(finalized):
    path, _ = finalized
    assert (path / "instances.csv").is_file()
    rows = read_instance_table(path)
    assert rows == [{c: r.get(c) for c in INSTANCE_COLUMNS} for r in ROWS]
    assert isinstance(rows[0]["label"], int) and isinstance(rows[0]["score"], float)
    header = (path / "instances.csv").read_text().splitlines()[0]
    assert header == ",".join(INSTANCE_COLUMNS)


def test_instance_table_accepts_numpy_values_and_dataframes(tmp_path):
    rows = [{"label": np.uint32(3), "prompt_index": np.int64(1), "score": np.float32(0.5), "extra": "x"}]
    write_instance_table(tmp_path / "a.csv", rows)
    (back,) = read_instance_table(tmp_path / "a.csv")
    assert back["label"] == 3 and back["prompt_index"] == 1 and back["score"] == 0.5
    assert back["class_name"] is None and back["area_um2"] is None
    pd = pytest.importorskip("pandas")
    write_instance_table(tmp_path / "b.csv", pd.DataFrame(ROWS))
    assert read_instance_table(tmp_path / "b.csv") == _round_trip(ROWS, tmp_path / "c.csv")
    with pytest.raises(ValueError):
        write_instance_table(tmp_path / "d.csv", [{"prompt_index": 1}])


def test_is_complete_lifecycle(tmp_path):
    path = tmp_path / "s.zarr"
    assert not is_complete(path)
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.25)
    _fill(store, _sparse_labels())
    assert not is_complete(path)
    store.finalize(ROWS)
    store.close()
    assert is_complete(path)


def test_is_complete_detects_damage(finalized, tmp_path):
    path, _ = finalized
    damaged = tmp_path / "no-table.zarr"
    shutil.copytree(path, damaged)
    (damaged / "instances.csv").unlink()
    assert not is_complete(damaged)
    damaged = tmp_path / "no-level.zarr"
    shutil.copytree(path, damaged)
    shutil.rmtree(damaged / "3")
    assert not is_complete(damaged)
    damaged = tmp_path / "no-attrs.zarr"
    shutil.copytree(path, damaged)
    attrs = json.loads((damaged / ".zattrs").read_text())
    del attrs["image-label"]
    (damaged / ".zattrs").write_text(json.dumps(attrs))
    assert not is_complete(damaged)
    assert is_complete(path)


def test_atomic_output_workflow(tmp_path):
    final = tmp_path / "out" / "slide.labels.zarr"
    labels = _sparse_labels(2)
    with atomic_output(final) as tmp:
        store = LabelStore.create(tmp, W, H, chunk=C, mpp=0.25)
        _fill(store, labels)
        store.finalize(ROWS)
        store.close()
        assert not final.exists()
    assert is_complete(final)
    np.testing.assert_array_equal(open_labels(final)[:], labels)
    assert read_instance_table(final)[0]["label"] == 1


def test_open_labels_is_read_only(finalized):
    path, labels = finalized
    level0 = open_labels(path)
    assert level0.shape == (H, W) and level0.dtype == np.uint32
    np.testing.assert_array_equal(level0[:], labels)
    with pytest.raises(Exception):
        level0[0, 0] = 1
    with pytest.raises(OutputError):
        open_labels(path.parent / "missing.zarr")
