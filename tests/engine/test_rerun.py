"""Incremental reruns through :func:`segment`: stable ids, only the touched clicks recomputed, and the
outputs of a from-scratch run with the same id table, byte for byte.

The network is :class:`tests.helpers.GuidedDiskNet` (fp32 convolutions over image and guidance), so a
piece taken from the wrong patch, guidance or batch would show in the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import grid_clicks, guided_model, ids_by_click, outputs, write_clicks_csv, write_tiff_slide
from nuclick_wsi.engine.background import Timer
from nuclick_wsi.engine.clicks import ClickStrategy
from nuclick_wsi.engine.identity import IdTable
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.io.slides.registry import open_slide
from nuclick_wsi.outputs.commit import write_marker
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.store import ngff
from nuclick_wsi.store.labels import open_labels
from nuclick_wsi.store.rerun import FOLDER, read_state

PATCH, HALF, BS = 128, 64, 16


def run(slide, pts, out, model=None, **opts):
    opts = {"progress": False, "device": "cpu", "precision": "fp32", "batch_size": BS,
            "formats": ("qupath", "asap", "geoparquet"), **opts}
    return segment(slide, pts, out, options=SegmentOptions(**opts), models=Models(nuclei=model or guided_model()))


def from_scratch_with_same_ids(before: Path, slide, pts, ref: Path, model=None, **opts) -> dict[str, str]:
    """The outputs of a from-scratch run (every click recomputed) with the id table ``before`` held."""
    shutil.copytree(before, ref)
    r = run(slide, pts, ref, model, recompute=True, **opts)
    assert r.report["rerun"]["reused"] == 0
    return outputs(ref)


@pytest.fixture
def case(tmp_path):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    clicks = grid_clicks(512, 384)
    return slide, clicks, tmp_path


def test_reordering_the_clicks_file_changes_nothing(case, monkeypatch):
    import nuclick_wsi.engine.run as engine_run

    slide, clicks, tmp = case
    out = tmp / "out"
    first = run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    before = outputs(out)
    shuffled = [clicks[k] for k in np.random.default_rng(1).permutation(len(clicks))]
    traced = []
    real_trace = engine_run.trace_mask
    monkeypatch.setattr(engine_run, "trace_mask", lambda *a: traced.append(1) or real_trace(*a))
    again = run(slide, write_clicks_csv(tmp / "b.csv", shuffled), out)
    assert traced == []  # the same final masks: their outlines are the earlier run's
    assert again.report["rerun"]["mode"] == "incremental"
    assert again.report["rerun"]["recomputed"] == 0 and again.report["rerun"]["reused"] == len(clicks)
    assert ids_by_click(again.report) == ids_by_click(first.report)
    after = outputs(out)
    for name in ("slide.geojson", "slide.xml", "slide.labels.zarr/0/0/0", "slide.labels.zarr/nuclick-rerun/pieces.bin"):
        assert after[name] == before[name], name
    # what names a click's place in the file follows the file (the report, instance table, GeoParquet)
    assert after["slide.labels.zarr/instances.csv"] != before["slide.labels.zarr/instances.csv"]


@pytest.mark.parametrize("slide_mpp", [0.25, 0.5])  # 0.5: the patches are resampled reads
def test_inserting_a_click_keeps_every_other_id_and_uuid_and_equals_a_fresh_run(tmp_path, slide_mpp):
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, slide_mpp)
    clicks = grid_clicks(512, 384)
    out = tmp_path / "out"
    first = run(slide, write_clicks_csv(tmp_path / "a.csv", clicks), out)
    before = tmp_path / "before"
    shutil.copytree(out, before)
    new = (300.37, 190.12, "A")
    edited = clicks[:20] + [new] + clicks[20:]
    again = run(slide, write_clicks_csv(tmp_path / "b.csv", edited), out)
    old, now = ids_by_click(first.report), ids_by_click(again.report)
    assert all(now[k] == v for k, v in old.items())
    assert now[new][0] == len(clicks) + 1
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental" and 0 < rerun["recomputed"] < len(clicks) // 2
    assert rerun["ids"] == {"kept": len(clicks), "new": 1, "removed": 0, "next_id": len(clicks) + 2}
    assert outputs(out) == from_scratch_with_same_ids(before, slide, tmp_path / "b.csv", tmp_path / "ref")
    labels = open_labels(out / "slide.labels.zarr")[:]
    assert labels[math.floor(new[1]), math.floor(new[0])] == len(clicks) + 1


def in_patch(of, at) -> bool:
    """Whether level-0 point ``at`` lies in the patch of click ``of`` (scale 1), off its centre pixel."""
    c = math.floor(at[0]) - math.floor(of[0]) + HALF
    r = math.floor(at[1]) - math.floor(of[1]) + HALF
    return 0 <= c < PATCH and 0 <= r < PATCH and (c, r) != (HALF, HALF)


def test_a_moved_click_recomputes_its_neighbours_within_the_patch_reach_and_no_others(case):
    slide, clicks, tmp = case
    out = tmp / "out"
    run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    before = tmp / "before"
    shutil.copytree(out, before)
    k = 37
    old = clicks[k]
    moved = (round(old[0] + 3.4, 2), round(old[1] - 2.2, 2), old[2])
    edited = clicks[:k] + [moved] + clicks[k + 1:]
    pts = write_clicks_csv(tmp / "b.csv", edited)
    expect = {j for j, c in enumerate(edited) if j == k or in_patch(c, old) or in_patch(c, moved)}
    assert 3 < len(expect) < len(clicks) // 2
    # which clicks the strategy sends to the network, given the earlier run's pieces
    rep = json.loads((out / "slide.report.json").read_text())
    state = read_state(out / "slide.labels.zarr", rep["rerun"]["state_sha256"])
    prompts = read_prompts(pts)
    labels, uuids, _ = IdTable.from_json(state.ids).assign(prompts.clicks, "slide")
    src = open_slide(slide)
    try:
        s = ClickStrategy(src, prompts, 0.25, PATCH, 0.25, batch_size=BS, labels=labels, uuids=uuids,
                          cache=state.pieces)
        groups = list(s.batches(s.plan({}), Timer()))
    finally:
        src.close()
    assert {item[0] for _, items in groups for item in items if item[4] is not None} == expect
    assert all(b is None or b.shape[0] == BS for b, _ in groups)  # fixed-size batches, the last one padded
    again = run(slide, pts, out)
    assert again.report["rerun"]["recomputed"] == len(expect)
    assert again.report["rerun"]["reused"] == len(clicks) - len(expect)
    assert outputs(out) == from_scratch_with_same_ids(before, slide, pts, tmp / "ref")


def test_add_move_delete_at_once_equals_a_fresh_run_with_the_same_ids(case):
    slide, clicks, tmp = case
    out = tmp / "out"
    run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    before = tmp / "before"
    shutil.copytree(out, before)
    rng = np.random.default_rng(3)
    edited = [c for j, c in enumerate(clicks) if j % 17 != 5]  # delete
    edited = [(round(x + 2.5, 2), y, c) if j % 23 == 0 else (x, y, c) for j, (x, y, c) in enumerate(edited)]  # move
    edited += [(round(x + 20, 2), round(y + 21, 2), c) for x, y, c in clicks[3::29]]  # add, between the others
    edited = [edited[j] for j in rng.permutation(len(edited))]
    again = run(slide, write_clicks_csv(tmp / "b.csv", edited), out)
    assert again.report["rerun"]["mode"] == "incremental" and again.report["rerun"]["reused"] > 0
    assert outputs(out) == from_scratch_with_same_ids(before, slide, tmp / "b.csv", tmp / "ref")


@pytest.mark.parametrize("change, why", [
    ("weights", "model weights changed"),
    ("mpp", "slide um/px changed"),
    ("threshold", "thresholds changed"),
    ("batch size", "batch size changed"),
])
def test_a_changed_model_um_per_px_or_threshold_forces_a_full_run(case, change, why):
    slide, clicks, tmp = case
    out = tmp / "out"
    pts = write_clicks_csv(tmp / "a.csv", clicks)
    first = run(slide, pts, out)
    model, opts = guided_model(), {}
    if change == "weights":
        with torch.no_grad():
            model.net.conv.bias.fill_(0.25)
    elif change == "mpp":
        opts["mpp"] = 0.26  # within the native tolerance: the same pixels, another um/px
    elif change == "threshold":
        model = guided_model(threshold=0.4)
    else:
        opts["batch_size"] = BS * 2
    again = run(slide, pts, out, model, **opts)
    assert again.report["rerun"]["mode"] == "full"
    assert again.report["rerun"]["why_full"] == why
    assert again.report["rerun"]["reused"] == 0 and again.report["rerun"]["recomputed"] == len(clicks)
    assert ids_by_click(again.report).keys() == ids_by_click(first.report).keys()
    assert all(v[0] == ids_by_click(first.report)[k][0] for k, v in ids_by_click(again.report).items())


@pytest.mark.parametrize("damage", ["pieces.bin altered", "state.json truncated", "report missing",
                                    "label store incomplete", "report of another run", "report of an older version",
                                    "report truncated"])
def test_a_corrupt_or_partial_previous_output_is_never_reused(case, damage):
    slide, clicks, tmp = case
    out = tmp / "out"
    run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    state = out / "slide.labels.zarr" / FOLDER
    if damage == "pieces.bin altered":
        data = bytearray((state / "pieces.bin").read_bytes())
        data[100] ^= 0xFF
        (state / "pieces.bin").write_bytes(bytes(data))
    elif damage == "state.json truncated":
        (state / "state.json").write_bytes((state / "state.json").read_bytes()[:-40])
    elif damage == "report missing":  # a run killed between its renames and the report (its marker left)
        (out / "slide.report.json").unlink()
        write_marker(out / "slide.report.json", out.iterdir())
    elif damage == "label store incomplete":
        (out / "slide.labels.zarr" / ".zattrs").unlink()
    elif damage == "report truncated":
        (out / "slide.report.json").write_text((out / "slide.report.json").read_text()[:500])
    else:
        rep = json.loads((out / "slide.report.json").read_text())
        if damage == "report of an older version":
            del rep["rerun"]
        else:
            rep["rerun"]["state_sha256"] = "0" * 64
        (out / "slide.report.json").write_text(json.dumps(rep))
    shuffled = clicks[::-1]
    again = run(slide, write_clicks_csv(tmp / "b.csv", shuffled), out)
    assert again.report["rerun"]["mode"] == "full" and again.report["rerun"]["reused"] == 0
    why = again.report["rerun"]["why_full"]
    assert why.startswith("earlier outputs not reusable: ") or why == "no earlier run in the output folder", why
    # nothing of it is trusted, the id table neither: a fresh table in the new file's order
    assert [r["instance_id"] for r in again.report["clicks"]] == list(range(1, len(clicks) + 1))
    fresh = run(slide, tmp / "b.csv", tmp / "fresh", full=True)
    assert fresh.report["rerun"]["why_full"] == "--full"
    assert outputs(out) == outputs(tmp / "fresh")


def test_full_starts_a_fresh_id_table(case, caplog):
    slide, clicks, tmp = case
    out = tmp / "out"
    run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    with caplog.at_level("INFO", logger="nuclick_wsi"):
        again = run(slide, write_clicks_csv(tmp / "b.csv", clicks[::-1]), out, full=True)
    assert [r.getMessage() for r in caplog.records] == ["full run: --full"]  # one log line says why
    assert again.report["rerun"] == {**again.report["rerun"], "mode": "full", "why_full": "--full", "reused": 0}
    assert [r["instance_id"] for r in again.report["clicks"]] == list(range(1, len(clicks) + 1))


def chunk_rows(out: Path, report) -> dict:
    """The chunk table of the rerun state in ``out`` (per (level, cy, cx): labels digest, file SHA-256)."""
    return read_state(out / "slide.labels.zarr", report["rerun"]["state_sha256"]).chunks.rows


def changed_level0_chunks(a, b, chunk: int) -> set[tuple[int, int, int]]:
    """Level-0 chunks holding labels in ``b`` that differ from ``a``'s."""
    return {(0, cy, cx) for cy in range(-(-a.shape[0] // chunk)) for cx in range(-(-a.shape[1] // chunk))
            if (b[cy * chunk:(cy + 1) * chunk, cx * chunk:(cx + 1) * chunk]
                != a[cy * chunk:(cy + 1) * chunk, cx * chunk:(cx + 1) * chunk]).any()
            and b[cy * chunk:(cy + 1) * chunk, cx * chunk:(cx + 1) * chunk].any()}


def spoil(store: Path, version: str, key, how: str) -> None:
    path = store / ngff.chunk_key(version, *key)
    if how == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("damaged", [False, True])
def test_a_rerun_copies_the_chunk_files_it_did_not_touch_and_encodes_the_others(case, version, damaged):
    slide, clicks, tmp = case
    out, chunk = tmp / "out", 128  # 4 x 3 chunks, pyramid 2 x 2 and 1
    first = run(slide, write_clicks_csv(tmp / "a.csv", clicks), out, chunk=chunk, ngff=version)
    before = tmp / "before"
    shutil.copytree(out, before)
    old_rows, old_labels = chunk_rows(out, first.report), open_labels(out / "slide.labels.zarr")[:]
    k = min(range(len(clicks)), key=lambda j: math.hypot(clicks[j][0] - 300, clicks[j][1] - 190))  # chunk (1, 2)
    moved = (round(clicks[k][0] + 3.4, 2), round(clicks[k][1] - 2.2, 2), clicks[k][2])
    pts = write_clicks_csv(tmp / "b.csv", clicks[:k] + [moved] + clicks[k + 1:])
    spoilt = []
    if damaged:  # chunk files far from the edit: their labels are unchanged, their bytes not
        spoilt = [(0, 0, 0), (0, 2, 0), (1, 0, 0)]
        for key, how in zip(spoilt, ("alter", "delete", "alter")):
            spoil(out / "slide.labels.zarr", version, key, how)
    again = run(slide, pts, out, chunk=chunk, ngff=version)
    rows, labels = chunk_rows(out, again.report), open_labels(out / "slide.labels.zarr")[:]
    changed = {key for key in rows if old_rows.get(key) != rows[key]}
    touched = changed_level0_chunks(old_labels, labels, chunk)
    assert touched and {key for key in changed if key[0] == 0} == touched  # level 0: the chunks the edit touched
    assert not set(spoilt) & changed and set(spoilt) <= set(rows)  # the spoilt files hold the same labels
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental"
    # a level-0 chunk file spoilt: its labels cannot be read back, so every instance is stitched again
    assert (rerun["taken"] == 0) if damaged else (0 < rerun["taken"] <= rerun["reused"])
    assert rerun["chunks_written"] == len(changed) + len(spoilt)  # touched or spoilt: encoded
    assert rerun["chunks_copied"] == len(rows) - len(changed) - len(spoilt) > 0  # the rest: copied
    assert outputs(out) == from_scratch_with_same_ids(before, slide, pts, tmp / "ref", chunk=chunk, ngff=version)
    ref = json.loads((tmp / "ref" / "slide.report.json").read_text())["rerun"]
    assert ref["chunks_copied"] == 0 and ref["chunks_written"] == len(rows)


def rewrite_state(out: Path, report, edit) -> None:
    """Edit the rerun state in ``out`` (``edit(doc)`` on its state.json) and make its report name the result."""
    state = out / "slide.labels.zarr" / FOLDER / "state.json"
    doc = json.loads(state.read_bytes())
    edit(doc)
    state.write_bytes(json.dumps(doc, sort_keys=True).encode())
    rep = dict(report, rerun=dict(report["rerun"], state_sha256=hashlib.sha256(state.read_bytes()).hexdigest()))
    (out / "slide.report.json").write_text(json.dumps(rep))


def older_format(fmt: str, *dropped: str):
    """A :func:`rewrite_state` edit making the state one of format ``fmt``, without its ``dropped`` sections."""
    def edit(doc):
        doc["format"] = fmt
        for key in dropped:
            del doc[key]
    return edit


def test_a_state_of_the_older_format_keeps_the_ids_and_copies_no_chunk(case):
    slide, clicks, tmp = case
    out = tmp / "out"
    first = run(slide, write_clicks_csv(tmp / "a.csv", clicks), out)
    rewrite_state(out, first.report, older_format("nuclick-wsi-rerun/1", "chunks", "contents"))
    before = tmp / "before"
    shutil.copytree(out, before)
    edited = clicks[::-1] + [(300.37, 190.12, "A")]
    again = run(slide, write_clicks_csv(tmp / "b.csv", edited), out)
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental" and rerun["chunks_copied"] == 0 and rerun["chunks_written"] > 0
    assert rerun["ids"]["kept"] == len(clicks)
    old, now = ids_by_click(first.report), ids_by_click(again.report)
    assert all(now[k] == v for k, v in old.items())
    assert outputs(out) == from_scratch_with_same_ids(before, slide, tmp / "b.csv", tmp / "ref")


def test_crowded_nuclei_an_edit_restitches_the_chains_of_touching_instances_it_reaches(tmp_path):
    """Disks wider than the clicks' spacing: neighbours contest pixels, so what an edit changes spreads
    along chains of touching instances. The rerun stitches those again, takes the others, and equals a
    from-scratch run byte for byte."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    # clusters of three touching nuclei (disks of radius 9, 12 px apart), clusters 45 px apart
    clicks = [(round(x + dx, 2), round(y + dy, 2), c) for x, y, c in grid_clicks(500, 372, seed=4)
              for dx, dy in ((0, 0), (12.3, 0.4), (5.1, 11.6))]
    model = guided_model(radius=9.0)
    out = tmp_path / "out"
    run(slide, write_clicks_csv(tmp_path / "a.csv", clicks), out, model)
    before = tmp_path / "before"
    shutil.copytree(out, before)
    edited = [c for j, c in enumerate(clicks) if j not in (40, 41, 130)]  # delete
    edited[100] = (round(edited[100][0] + 2.3, 2), edited[100][1], edited[100][2])  # move
    edited.append((round(clicks[200][0] - 7.5, 2), round(clicks[200][1] + 6.5, 2), "A"))  # add
    pts = write_clicks_csv(tmp_path / "b.csv", edited[::-1])
    again = run(slide, pts, out, model)
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental"
    # some reused pieces were stitched again (their chain reaches an edit), most were taken
    assert 0 < rerun["taken"] < rerun["reused"] and rerun["taken"] > len(edited) // 2
    assert outputs(out) == from_scratch_with_same_ids(before, slide, pts, tmp_path / "ref", model)


def test_a_state_whose_finals_name_an_unknown_piece_gives_a_full_run(case):
    """A state consistent with its report (sha) but whose final instances name no piece of it is not
    reused, like any other inconsistent earlier output (review finding: it crashed the run)."""
    slide, clicks, tmp = case
    out = tmp / "out"
    first = run(slide, write_clicks_csv(tmp / "a.csv", clicks), out, chunk=128)
    rewrite_state(out, first.report, lambda doc: doc["finals"]["rows"].append(
        ["0" * 32 + ":999", 10.0, 0.5, 1.0, 1.0, doc["finals"]["rows"][0][5]]))
    again = run(slide, write_clicks_csv(tmp / "b.csv", clicks[1:]), out, chunk=128)
    assert again.report["rerun"]["mode"] == "full"
    assert "names no piece" in again.report["rerun"]["why_full"]


def test_a_slide_of_the_same_name_from_another_folder_says_it_replaces_the_other_slides_outputs(case, caplog):
    """c1/slide.tif then c2/slide.tif into one -o: the second run replaces the first's outputs (same stem);
    it says so, naming the other slide. The same slide again, or a moved one, says nothing."""
    slide, clicks, tmp = case
    out, pts = tmp / "out", write_clicks_csv(tmp / "a.csv", clicks)
    run(slide, pts, out)
    with caplog.at_level("WARNING", logger="nuclick_wsi"):
        run(slide, pts, out)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    other = tmp / "c2" / "slide.tif"
    other.parent.mkdir()
    write_tiff_slide(other, 512, 384, 0.25)
    caplog.clear()
    with caplog.at_level("WARNING", logger="nuclick_wsi"):
        run(other, pts, out)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "another slide of the same name" in warned[0] and str(slide) in warned[0]
    moved = tmp / "c3" / "slide.tif"  # the earlier slide (c2) moved away: no other slide to speak of
    moved.parent.mkdir()
    other.rename(moved)
    caplog.clear()
    with caplog.at_level("WARNING", logger="nuclick_wsi"):
        run(moved, pts, out)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


#: one band of 12 clicks in one region of a 400 x 400 px slide, their patches overlapping in a row
BAND = [(round(20.37 + 20 * j, 2), round(40.21 + j % 3, 2), "AB"[j % 2]) for j in range(12)]
FAR = (200.5, 200.5, "A")  #: in the band's region (tile), outside every band click's patch


def patch_bytes(slide, clicks, model_mpp: float = 0.25) -> dict[tuple, bytes]:
    """Each click's patch pixels as cut from its region's read (how a from-scratch run reads them)."""
    from nuclick_wsi.engine.clicks import TILE
    from nuclick_wsi.guidance.clicks import effective_scale, patch_origin, plan_regions

    src = open_slide(slide)
    try:
        scale = effective_scale(model_mpp, src.mpp)
        xs, ys = np.array([c[0] for c in clicks]), np.array([c[1] for c in clicks])
        out = {}
        for r in plan_regions(xs, ys, scale, PATCH, tile=TILE):
            img = src.read_region(r.x0, r.y0, r.width * scale, r.height * scale, r.width, r.height)
            for k in r.clicks:
                c0, r0 = patch_origin(xs[k], ys[k], r, scale, PATCH)
                out[clicks[k]] = img[r0:r0 + PATCH, c0:c0 + PATCH].tobytes()
        return out
    finally:
        src.close()


@pytest.mark.parametrize("slide_mpp", [0.5, 0.499])  # 0.499: the widened read changes some patches' last bits
def test_a_click_that_widens_a_resampled_region_recomputes_only_the_patches_it_changes(tmp_path, slide_mpp):
    """On a resampled slide a click's signature holds its region's read box; a click added far from
    the others but in their region widens that box. Only the added click and the clicks whose patch
    pixels came out other bits are recomputed (reused by content key), and the outputs are a
    from-scratch run's, byte for byte; the next rerun reuses every piece by its new signature."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 400, 400, slide_mpp)
    out = tmp_path / "out"
    run(slide, write_clicks_csv(tmp_path / "a.csv", BAND), out)
    before = tmp_path / "before"
    shutil.copytree(out, before)
    old, new = patch_bytes(slide, BAND), patch_bytes(slide, BAND + [FAR])
    changed = [c for c in BAND if old[c] != new[c]]
    assert (len(changed) == 0) if slide_mpp == 0.5 else (0 < len(changed) < len(BAND))
    pts = write_clicks_csv(tmp_path / "b.csv", BAND + [FAR])
    again = run(slide, pts, out)
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental"
    assert rerun["recomputed"] == 1 + len(changed) and rerun["reused"] == len(BAND) - len(changed)
    if not changed:  # the pieces reused by content are taken as the earlier run left them
        assert rerun["taken"] == rerun["reused"]
    assert outputs(out) == from_scratch_with_same_ids(before, slide, pts, tmp_path / "ref")
    third = run(slide, write_clicks_csv(tmp_path / "c.csv", (BAND + [FAR])[::-1]), out)
    assert third.report["rerun"]["recomputed"] == 0 and third.report["rerun"]["reused"] == len(BAND) + 1


def test_a_resampled_rerun_from_a_state_without_content_keys_keys_the_pieces_it_reuses(tmp_path):
    """A state of format /3 (no content keys): a click whose signature it holds is reused and its patch
    read to key it, so the rerun's outputs, rerun state included, are a from-scratch run's."""
    slide = write_tiff_slide(tmp_path / "slide.tif", 400, 400, 0.499)
    out = tmp_path / "out"
    first = run(slide, write_clicks_csv(tmp_path / "a.csv", BAND), out)
    assert len(read_state(out / "slide.labels.zarr", first.report["rerun"]["state_sha256"]).contents) == len(BAND)
    rewrite_state(out, first.report, older_format("nuclick-wsi-rerun/3", "contents"))
    before = tmp_path / "before"
    shutil.copytree(out, before)
    pts = write_clicks_csv(tmp_path / "b.csv", BAND[::-1] + [(200.5, 300.5, "A")])  # another region
    again = run(slide, pts, out)
    rerun = again.report["rerun"]
    assert rerun["mode"] == "incremental" and rerun["recomputed"] == 1 and rerun["reused"] == len(BAND)
    assert rerun["taken"] == len(BAND)
    assert outputs(out) == from_scratch_with_same_ids(before, slide, pts, tmp_path / "ref")
