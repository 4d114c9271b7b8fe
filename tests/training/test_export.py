"""export-training: segment outputs -> a training set that `train` reads back pixel for pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box

import nuclick_wsi.io.slides as slides_mod
from nuclick_wsi import __version__
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.annotations import read_qupath_polygons
from nuclick_wsi.io.datasets import find_pairs
from nuclick_wsi.training.export import SlideRun, export_training, match_rois
from nuclick_wsi.training.train import load_tiles
from tests.helpers import RecordingSource, canonical_labels, labels_at_pixel_centres, roi_file, segmented_blobs


@pytest.fixture
def segmented(tmp_path):
    return segmented_blobs(tmp_path)


def test_export_round_trip_train_reads_the_outlines_pixel_for_pixel(segmented, tmp_path, monkeypatch):
    slide, out = segmented
    reads, original = [], slides_mod.open_slide

    def recording_open(*a, **kw):
        reads.append(RecordingSource(original(*a, **kw)))
        return reads[-1]

    monkeypatch.setattr(slides_mod, "open_slide", recording_open)
    area = box(60, 40, 420, 330)
    manifest = export_training(out, tmp_path / "ds", tile=96, rois=[roi_file(tmp_path / "blobs.roi.geojson", area)],
                               progress=False, log=lambda m: None)
    assert reads and all(w == h == 96 * 0.5 for w, h in reads[0].sizes)  # one tile per read, never the slide
    written = read_qupath_polygons(out / "blobs.geojson")
    outlines = [p["geometry"] for p in written]
    assert manifest["classes"] == {"background": 0, "Stroma": 1, "Tumor": 2}
    tiles = {t.name: t for t in load_tiles([str(tmp_path / "ds")], log=lambda m: None)}
    assert set(tiles) == {t["name"] for t in manifest["tiles"]} and len(tiles) == len(reads[0].sizes)
    assert all(kind == "instances" and ann.parent.name == "labels" for _, ann, kind in find_pairs(tmp_path / "ds"))
    n_labelled = 0
    for entry in manifest["tiles"]:
        t = tiles[entry["name"]]
        x0, y0, w, _ = entry["region_level0"]
        want = labels_at_pixel_centres(outlines, x0, y0, w / 96, (96, 96))
        assert np.array_equal(canonical_labels(t.labels), canonical_labels(want)), entry["name"]
        valid = labels_at_pixel_centres([area], x0, y0, w / 96, (96, 96)) > 0
        assert np.array_equal(t.valid, valid)
        # only nuclei whose centroid lies inside the ROI are clicked in training
        for i in t.targets:
            ys, xs = np.nonzero(t.labels == i)
            assert valid[int(ys.mean()), int(xs.mean())]
        n_labelled += int(t.labels.max())
        assert entry["instances"] == int(t.labels.max())
        # the type of each instance is its outline's class (HoVer-Net's type map)
        for i, type_id in entry["types"].items():
            ys, xs = np.nonzero(t.labels == int(i))
            k = int(want[ys[0], xs[0]]) - 1
            assert type_id == manifest["classes"][written[k]["class_name"]]
    assert n_labelled > 10


def test_manifest_provenance_and_roi_filter(segmented, tmp_path):
    slide, out = segmented
    area = box(300, 200, 380, 260)
    manifest = export_training(out, tmp_path / "ds", tile=64, rois=[roi_file(tmp_path / "r.geojson", area)],
                               progress=False, log=lambda m: None)
    step = 64 * 0.5
    cells = {(int(c * step), int(r * step)) for c in range(9, 12) for r in range(6, 9)}  # 288..384 x 192..288
    assert {tuple(t["region_level0"][:2]) for t in manifest["tiles"]} == {(float(x), float(y)) for x, y in cells}
    report = json.loads((out / "blobs.report.json").read_text())
    src = manifest["slides"][0]
    assert src["slide"] == str(slide) and src["model"] == report["model"]["source"] == "test:dark"
    assert src["slide_mpp"] == 0.5 and manifest["mpp"] == 0.25 and src["roi"].endswith("r.geojson")
    assert manifest["nuclick_wsi_version"] == __version__ and manifest["date"].startswith("20")
    assert manifest["mode"] == "roi" and manifest["complete"] is True and manifest["tool"] == "nuclick-wsi export-training"
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk["tiles"] == manifest["tiles"]
    for sub, ext in (("images", "png"), ("labels", "tif"), ("valid", "png"), ("geojson", "geojson")):
        assert sorted(p.stem for p in (tmp_path / "ds" / sub).glob(f"*.{ext}")) == sorted(t["name"] for t in manifest["tiles"])


def test_around_outlines_marks_only_the_grown_outlines_valid(segmented, tmp_path):
    _, out = segmented
    m = export_training(out, tmp_path / "ds", tile=64, around_outlines=True, progress=False, log=lambda m: None)
    assert m["mode"] == "around-outlines" and m["complete"] is False and "ignore" in m["note"]
    tiles = load_tiles([str(tmp_path / "ds")], log=lambda m: None)
    assert all(t.valid[t.labels > 0].all() and not t.valid.all() for t in tiles)


def test_an_earlier_export_is_replaced_whole(segmented, tmp_path):
    _, out = segmented
    export_training(out, tmp_path / "ds", tile=64, around_outlines=True, progress=False, log=lambda m: None)
    (tmp_path / "ds" / "images" / "stale.png").write_bytes(b"x")
    export_training(out, tmp_path / "ds", tile=64, around_outlines=True, progress=False, log=lambda m: None)
    assert not (tmp_path / "ds" / "images" / "stale.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".nuclick-tmp")] == []


def test_bad_report_and_missing_slide_name_the_file(segmented, tmp_path):
    slide, out = segmented
    rep = out / "blobs.report.json"
    data = json.loads(rep.read_text())
    data["slide"]["path"] = str(tmp_path / "gone.svs")
    rep.write_text(json.dumps(data))
    with pytest.raises(NuclickError, match=r"blobs\.report\.json: its slide .*gone\.svs is not found"):
        export_training(out, tmp_path / "ds", around_outlines=True, progress=False, log=lambda m: None)
    rep.write_text("{")
    with pytest.raises(NuclickError, match=r"blobs\.report\.json: not a nuclick-wsi segment report"):
        export_training(out, tmp_path / "ds", around_outlines=True, progress=False, log=lambda m: None)
    with pytest.raises(NuclickError, match=r"no S\.report\.json"):
        export_training(tmp_path / "ds-none", tmp_path / "ds", around_outlines=True, progress=False, log=lambda m: None)


def test_areas_files_are_matched_to_slides_by_stem(tmp_path):
    runs = [SlideRun(stem, tmp_path / f"{stem}.report.json", tmp_path / f"{stem}.svs", tmp_path / f"{stem}.geojson",
                     0.5, 0.25, "m", "auto", False) for stem in ("a", "ab")]
    got = match_rois(runs, [tmp_path / "ab.areas.geojson", tmp_path / "a.areas.geojson"])
    assert got == {"ab": tmp_path / "ab.areas.geojson", "a": tmp_path / "a.areas.geojson"}  # longest stem wins
    with pytest.raises(NuclickError, match=r"zz\.geojson: --roi matches no slide .*a, ab"):
        match_rois(runs, [tmp_path / "zz.geojson"])
    assert match_rois(runs[:1], [tmp_path / "any.geojson"]) == {"a": tmp_path / "any.geojson"}  # one slide, one file
