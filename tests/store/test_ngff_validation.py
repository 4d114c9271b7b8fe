"""Our outputs through readers and validators that are not ours.

Label stores (OME-NGFF 0.4 in zarr v2, 0.5 in zarr v3): ome-zarr-models validates them, ome-zarr's
reader (the one napari-ome-zarr uses) reads them back; GeoJSON: shapely validity and geopandas;
ASAP XML: a strict XSD of what ASAP's reader reads (tests/data/asap_annotations.xsd).
"""

from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas
import numpy as np
import ome_zarr_models.v04 as v04
import ome_zarr_models.v05 as v05
import pytest
import shapely
import xmlschema
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.store.instances import read_instance_table
from nuclick_wsi.store.labels import LabelStore, is_complete, level_shapes, open_labels
from tests.helpers import batch_cli, deterministic_files, disk_model, make_cohort, write_tiff_slide

VERSIONS = ("0.4", "0.5")
VALIDATOR = {"0.4": v04.ImageLabel, "0.5": v05.ImageLabel}
# Built at import (test collection): TIAToolbox 2.x calls defusedxml.defuse_stdlib() when its slide
# readers load, replacing xml.etree's iterparse process-wide, and xmlschema then refuses to build a schema.
ASAP_SCHEMA = xmlschema.XMLSchema(Path(__file__).parent.parent / "data" / "asap_annotations.xsd")
W, H, C = 300, 200, 64


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """``segment`` of one slide into every format, once per NGFF version: {version: (out, report)}."""
    root = tmp_path_factory.mktemp("ngff")
    slide = write_tiff_slide(root / "slide.tif", 1024, 768, 0.25)
    rng = np.random.default_rng(7)
    lines = ["x,y,class"] + [f"{x:.2f},{y:.2f},{c}" for x, y, c in
                             zip(rng.uniform(0, 1024, 30), rng.uniform(0, 768, 30), rng.choice(["A", "B"], 30))]
    pts = root / "clicks.csv"
    pts.write_text("\n".join(lines) + "\n")
    runs = {}
    for version in VERSIONS:
        opts = SegmentOptions(formats=("qupath", "asap", "geoparquet"), chunk=256, ngff=version, progress=False,
                              device="cpu")
        res = segment(slide, pts, root / version, options=opts, models=Models(nuclei=disk_model(6.0)))
        runs[version] = (root / version, res.report)
    return runs


def _fill(store: LabelStore, labels: np.ndarray, order=None) -> None:
    n_cy, n_cx = store.chunk_grid
    cells = [(cy, cx) for cy in range(n_cy) for cx in range(n_cx)]
    for cy, cx in order(cells) if order else cells:
        x0, y0, x1, y1 = store.chunk_bounds(cy, cx)
        if labels[y0:y1, x0:x1].any():
            store.write_chunk(cy, cx, labels[y0:y1, x0:x1])


def _labels(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), dtype=np.uint32)
    labels[10:50, 20:90] = rng.integers(0, 1000, (40, 70))
    labels[150:200, 250:300] = 7
    return labels


def _tree_digest(root: Path) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(Path(d, f).read_bytes()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


# ---------------------------------------------------------------------------------------------
# label stores


@pytest.mark.parametrize("version", VERSIONS)
def test_labels_pass_ome_zarr_models_of_their_version_only(segmented, version):
    out, _ = segmented[version]
    group = zarr.open_group(str(out / "slide.labels.zarr"), mode="r")
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    model = VALIDATOR[version].from_zarr(group)
    attrs = model.attributes if version == "0.4" else model.attributes.ome
    assert attrs.image_label.source is None  # no image-label.source pointing at a parent that is not there
    assert len(attrs.multiscales[0].datasets) == len(level_shapes(768, 1024, 256)) == 3
    other = VALIDATOR["0.5" if version == "0.4" else "0.4"]
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        other.from_zarr(group)


@pytest.mark.parametrize("version", VERSIONS)
def test_ome_zarr_reader_gives_the_same_arrays(segmented, version):
    out, report = segmented[version]
    path = out / "slide.labels.zarr"
    nodes = list(Reader(parse_url(str(path)))())
    node = nodes[0]
    assert any(isinstance(s, Label) for s in node.specs)
    level0 = open_labels(path)[:]
    assert (level0 > 0).sum() > 0 and len(np.unique(level0)) - 1 == report["totals"]["segmented"]
    assert len(node.data) == 3
    for k, data in enumerate(node.data):
        np.testing.assert_array_equal(np.asarray(data), level0[:: 2**k, :: 2**k])
    assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
    assert node.metadata["coordinateTransformations"][1] == [{"type": "scale", "scale": [0.5, 0.5]}]


@pytest.mark.parametrize("version", VERSIONS)
def test_napari_ome_zarr_opens_a_labels_layer(segmented, version):
    """napari-ome-zarr's own reader (0.10+ no longer goes through ome-zarr); CI installs it (README)."""
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    path = str(segmented[version][0] / "slide.labels.zarr")
    reader = napari_ome_zarr.napari_get_reader(path)
    assert reader is not None
    ((data, kwargs, kind),) = reader(path)
    assert kind == "labels" and len(data) == 3 and kwargs["scale"] == [0.25, 0.25]
    level0 = open_labels(path)[:]
    for k, level in enumerate(data):
        np.testing.assert_array_equal(np.asarray(level), level0[:: 2**k, :: 2**k])


def test_both_layouts_hold_the_same_labels_table_and_polygons(segmented):
    (a, _), (b, _) = segmented["0.4"], segmented["0.5"]
    np.testing.assert_array_equal(open_labels(a / "slide.labels.zarr")[:], open_labels(b / "slide.labels.zarr")[:])
    assert read_instance_table(a / "slide.labels.zarr") == read_instance_table(b / "slide.labels.zarr")
    for name in ("slide.geojson", "slide.xml", "slide.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_layout_files_per_version(segmented):
    v4, v5 = segmented["0.4"][0] / "slide.labels.zarr", segmented["0.5"][0] / "slide.labels.zarr"
    assert (v4 / ".zgroup").is_file() and (v4 / "0" / ".zarray").is_file() and not (v4 / "zarr.json").exists()
    attrs4 = json.loads((v4 / ".zattrs").read_text())
    assert attrs4["multiscales"][0]["version"] == attrs4["image-label"]["version"] == "0.4"
    assert not (v5 / ".zgroup").exists() and not (v5 / ".zattrs").exists()
    meta = json.loads((v5 / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    assert "version" not in meta["attributes"]["ome"]["multiscales"][0]
    arr = json.loads((v5 / "0" / "zarr.json").read_text())
    assert arr["dimension_names"] == ["y", "x"] and arr["chunk_grid"]["configuration"]["chunk_shape"] == [256, 256]
    assert any(p.parts[-3] == "c" for p in (v5 / "0").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("version", VERSIONS)
def test_reruns_are_byte_identical(tmp_path, version):
    """Chunks written in another order and a threaded pyramid give the same bytes, in both layouts."""
    labels = _labels()
    digests = []
    for k, (order, workers) in enumerate([(None, 1), (lambda cells: cells[::-1], 4)]):
        store = LabelStore.create(tmp_path / f"{k}.zarr", W, H, chunk=C, mpp=0.25, ngff_version=version)
        _fill(store, labels, order)
        store.finalize([{"label": 7}], colors={7: (1, 2, 3)}, workers=workers)
        store.close()
        digests.append(_tree_digest(tmp_path / f"{k}.zarr"))
    assert digests[0] == digests[1] and len(digests[0]) > 10


def test_ngff_05_lifecycle_other_process_and_empty_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    labels = _labels(1)
    store = LabelStore.create(path, W, H, chunk=C, mpp=None, ngff_version="0.5")
    assert not is_complete(path)
    _fill(store, labels)
    other = LabelStore.open(path)  # as another process would
    assert other.ngff == "0.5"
    other.write_chunk(3, 4, np.zeros((H - 3 * C, W - 4 * C), np.uint32))  # all zero: the stored chunk goes
    assert not (path / "0" / "c" / "3" / "4").exists() and (path / "0" / "c" / "0" / "0").is_file()
    labels[3 * C :, 4 * C :] = 0
    other.finalize([{"label": 1}])
    assert is_complete(path)
    np.testing.assert_array_equal(open_labels(path)[:], labels)
    v05.ImageLabel.from_zarr(zarr.open_group(str(path), mode="r"))
    (path / "2" / "zarr.json").unlink()  # a pyramid level lost: no longer complete
    assert not is_complete(path)


def test_store_whose_layout_disagrees_with_its_version_is_incomplete(tmp_path):
    path = tmp_path / "s.zarr"
    store = LabelStore.create(path, W, H, chunk=C, mpp=0.5, ngff_version="0.5")
    store.finalize([])
    assert is_complete(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["nuclick-wsi"]["ngff"] = "0.4"
    (path / "zarr.json").write_text(json.dumps(meta))
    assert not is_complete(path)


def test_unknown_ngff_version_is_refused(tmp_path):
    with pytest.raises(ValueError, match="0.4, 0.5"):
        LabelStore.create(tmp_path / "s.zarr", W, H, mpp=None, ngff_version="0.6")
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------------------------------------
# polygons


def test_geojson_is_valid_and_reads_back_with_geopandas(segmented):
    out, report = segmented["0.4"]
    segmented_clicks = [r for r in report["clicks"] if r["status"] == "segmented"]
    frame = geopandas.read_file(out / "slide.geojson")
    assert len(frame) == len(segmented_clicks) > 10
    assert frame.geometry.is_valid.all() and not frame.geometry.is_empty.any()
    assert set(frame.geom_type) <= {"Polygon", "MultiPolygon"}
    assert set(frame["id"]) == {r["uuid"] for r in segmented_clicks}
    raw = json.loads((out / "slide.geojson").read_text())["features"]
    for feat in raw:  # shapely on the file's own coordinates, not geopandas' reading of them
        geom = shapely.geometry.shape(feat["geometry"])
        assert geom.is_valid and not geom.is_empty, shapely.is_valid_reason(geom)
    parquet = geopandas.read_parquet(out / "slide.parquet")
    assert len(parquet) == len(frame) and parquet.geometry.is_valid.all() and not parquet.geometry.is_empty.any()
    assert parquet.geometry.union_all().symmetric_difference(frame.geometry.union_all()).area < 1e-6


def test_asap_xml_matches_the_schema_asap_reads(segmented):
    out, report = segmented["0.4"]
    ASAP_SCHEMA.validate(out / "slide.xml")
    root = ET.parse(out / "slide.xml").getroot()
    groups = {g.get("Name") for g in root.iter("Group")}
    anns = root.find("Annotations").findall("Annotation")
    assert len(anns) >= report["totals"]["segmented"] > 10
    for ann in anns:
        assert ann.get("Type") == "Polygon" and ann.get("PartOfGroup") in groups | {"None"}
        orders = [int(c.get("Order")) for c in ann.iter("Coordinate")]
        assert orders == list(range(len(orders))) and len(orders) >= 3
        ring = shapely.Polygon([(float(c.get("X")), float(c.get("Y"))) for c in ann.iter("Coordinate")])
        assert ring.is_valid and ring.area > 0


def test_asap_schema_is_strict(tmp_path):
    schema = ASAP_SCHEMA
    good = ('<ASAP_Annotations><Annotations><Annotation Name="1" Type="Polygon" PartOfGroup="None" Color="#F4FA58">'
            '<Coordinates><Coordinate Order="0" X="1" Y="2"/></Coordinates></Annotation></Annotations>'
            '<AnnotationGroups/></ASAP_Annotations>')
    assert schema.is_valid(good)
    for bad in (good.replace(' Color="#F4FA58"', ""), good.replace('X="1"', 'X="one"'),
                good.replace('Type="Polygon"', 'Type="Polyline"'), good.replace("<AnnotationGroups/>", ""),
                good.replace("<Coordinates>", "<Coordinates><Point/>")):
        assert not schema.is_valid(bad), bad


# ---------------------------------------------------------------------------------------------
# batch: --ngff through the command, reruns, a change of version


def test_batch_ngff_05_reruns_identical_and_a_version_change_redoes(tmp_path):
    manifest = make_cohort(tmp_path, n=2)
    runs = {}
    for name, version in (("a", "0.5"), ("b", "0.5"), ("c", "0.4")):
        res = batch_cli(manifest, tmp_path / name, "--ngff", version, "--batch-size", "4")
        assert res.returncode == 0, res.stderr
        runs[name] = deterministic_files(tmp_path / name)
    assert runs["a"] == runs["b"] and "s0.labels.zarr/zarr.json" in runs["a"]
    assert "s0.labels.zarr/.zgroup" in runs["c"] and runs["c"]["s0.geojson"] == runs["a"]["s0.geojson"]
    for stem in ("s0", "s1"):
        VALIDATOR["0.5"].from_zarr(zarr.open_group(str(tmp_path / "a" / f"{stem}.labels.zarr"), mode="r"))
    # the 0.4 outputs are not complete for --ngff 0.5: redone in 0.5, then complete
    res = batch_cli(manifest, tmp_path / "c", "--ngff", "0.5", "--batch-size", "4")
    assert res.returncode == 0 and res.stdout.rstrip().endswith("2 segmented"), res.stdout + res.stderr
    assert deterministic_files(tmp_path / "c") == runs["a"]
    res = batch_cli(manifest, tmp_path / "c", "--ngff", "0.5", "--batch-size", "4")
    assert res.stdout.rstrip().endswith("2 complete"), res.stdout
