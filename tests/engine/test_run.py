"""Regression tests for bugs found in review (stitcher, background threads)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from tests.helpers import disk_model
from nuclick_wsi.engine.background import background
from nuclick_wsi.postprocess.trace import rasterize, trace_mask
from nuclick_wsi.pipeline import SegmentOptions, predict_labels
from nuclick_wsi.records import Click, Prompts
from nuclick_wsi.io.slides.memory import array_source
from nuclick_wsi.postprocess.stitch import Piece, Stitcher


def _stitcher(width, height, chunk):
    labels = np.zeros((height, width), np.uint32)
    retired: list[Piece] = []

    def write_chunk(cy, cx, block):
        labels[cy * chunk:cy * chunk + block.shape[0], cx * chunk:cx * chunk + block.shape[1]] = block

    return Stitcher(width, height, chunk, write_chunk, retired.append), labels, retired


def _piece(label, x0, y0, mask, prob, seed_rc):
    mask = np.asarray(mask, bool)
    seed = np.zeros_like(mask)
    seed[seed_rc] = True
    return Piece(label, x0, y0, mask, np.full(mask.shape, prob, np.float16), seed)


def test_rows_written_before_a_cut_are_not_changed_afterwards():
    # A spans chunk rows 0 and 1 with its click at the bottom; after flush(70) B (above 70, higher
    # probability) cuts A in two and A keeps only its click's part: the part in row 0 must not have
    # been written with A's label already.
    st, labels, retired = _stitcher(128, 128, 64)
    st.add(_piece(1, 10, 50, np.ones((30, 1)), 0.6, (28, 0)))
    st.flush(70)
    st.add(_piece(2, 5, 72, np.ones((1, 11)), 0.9, (0, 9)))
    st.close()
    assert sorted(p.label for p in retired) == [1, 2]
    for p in retired:
        assert np.array_equal(rasterize(trace_mask(p.mask, p.x0, p.y0), 0, 0, 128, 128), labels == p.label)
        assert ndi.label(labels == p.label)[1] == 1


def test_clipping_at_the_slide_edge_keeps_only_the_clicked_part():
    # two bars joined only through columns beyond the slide's right edge
    mask = np.zeros((3, 10), bool)
    mask[0, 4:] = mask[2, 4:] = mask[1, 9] = True
    st, labels, retired = _stitcher(20, 20, 64)
    st.add(_piece(1, 12, 5, mask, 0.9, (0, 4)))
    st.close()
    (p,) = retired
    assert ndi.label(labels == 1)[1] == 1
    assert labels[5, 16] == 1 and labels[7, 16] == 0


def test_two_clicks_in_one_pixel_never_give_an_instance_without_its_click():
    # duplicate_px=0 (what evaluate uses) and a slide at 0.5 um/px: the clicks fall in different
    # model pixels but the same level-0 pixel; the second must not keep a component without its click
    clicks = [(50.2, 50.2), (50.7, 50.9), (60.0, 50.0)]
    for mpp in (0.25, 0.5):
        src = array_source(np.full((100, 100, 3), 200, np.uint8), mpp)
        prompts = Prompts(clicks=[Click(x, y, index=i) for i, (x, y) in enumerate(clicks)])
        labels, instances, _ = predict_labels(src, prompts, disk_model(),
                                              options=SegmentOptions(progress=False, duplicate_px=0, device="cpu"))
        for inst in instances:
            x, y = clicks[inst.prompt_index]
            assert labels[int(y), int(x)] == inst.label
            assert inst.area_px > 0 and np.isfinite(inst.score)
        assert 2 not in {i.label for i in instances}


def _producers():
    return [t for t in threading.enumerate() if t.name == "nuclick-producer"]


def test_background_producer_ends_when_the_consumer_stops_early():
    before = len(_producers())

    def items(n, fail=False):
        yield from range(n)
        if fail:
            raise ValueError("late failure")

    for fail in (False, True):
        # exactly depth + 1 items: the producer used to block for ever putting its end marker
        it = background(items(4, fail), depth=3)
        next(it)
        time.sleep(0.3)
        it.close()
        assert len(_producers()) == before

    # closing waits for the item being made (e.g. a slide read) instead of returning mid-read
    state = {}

    def slow():
        yield 0
        time.sleep(0.3)
        state["done"] = True
        yield 1

    it = background(slow())
    next(it)
    time.sleep(0.05)
    it.close()
    assert state.get("done") and len(_producers()) == before


def test_nested_background_threads_end_after_a_consumer_error():
    before = len(_producers())

    def inner():
        yield from range(100)

    def middle():
        for x in background(inner()):
            yield x

    with pytest.raises(RuntimeError, match="post-processing failed"):
        for x in background(middle(), depth=2):
            if x == 3:
                raise RuntimeError("post-processing failed")
    assert len(_producers()) == before


def test_a_chunk_row_is_written_one_chunk_at_a_time():
    import tracemalloc

    chunk, n = 512, 32  # 32 chunks of 1 MB in one row
    written = []
    st = Stitcher(chunk * n, chunk, chunk, lambda cy, cx, block: written.append((cy, cx, int(block.max()))),
                  lambda p: None)
    for k in range(n):
        st.add(_piece(k + 1, k * chunk + 100, 100, np.ones((5, 5)), 0.9, (2, 2)))
    tracemalloc.start()
    try:
        st.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == [(0, k, k + 1) for k in range(n)]
    assert peak < 8 * chunk * chunk * 4


def test_two_clicks_in_one_model_pixel_at_80x_are_duplicates():
    # 0.125 um/px: a model pixel (0.25 um/px) is 2 x 2 level-0 px, so clicks 2.5 px apart share it;
    # the second used to become a 1 px instance punched into the first
    src = array_source(np.full((300, 300, 3), 200, np.uint8), 0.125)
    clicks = [(100.1, 100.1), (101.9, 101.9)]
    prompts = Prompts(clicks=[Click(x, y, index=i) for i, (x, y) in enumerate(clicks)])
    labels, instances, reasons = predict_labels(src, prompts, disk_model(), options=SegmentOptions(progress=False,
                                                                                                 device="cpu"))
    assert [i.label for i in instances] == [1]
    assert reasons[1].startswith("duplicate (of click 0")
    assert np.all(labels[96:106, 96:106] == 1)
