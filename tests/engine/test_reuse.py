"""Region reuse: which instances a rerun stitches again, and which it takes as the earlier run left them."""

from __future__ import annotations

import numpy as np

from nuclick_wsi.engine.reuse import Entry, overlapping_pairs, plan
from nuclick_wsi.store.rerun import PackedPiece, final_key


def packed(x0, y0, x1, y1) -> PackedPiece:
    return PackedPiece(x0, y0, y1 - y0, x1 - x0, 0.5, b"")




def test_overlapping_pairs_are_boxes_sharing_a_pixel_not_an_edge():
    a = np.array([[0, 0, 10, 10], [20, 20, 21, 21]])
    b = np.array([[10, 0, 20, 10], [9, 9, 12, 12], [20, 20, 21, 21], [0, 10, 10, 20]])
    i, j = overlapping_pairs(a, b)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (1, 2)]  # touching edges (b0, b3) share no pixel
    i, j = overlapping_pairs(b)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (1, 3)]


def test_overlapping_pairs_agree_with_a_brute_force_check():
    rng = np.random.default_rng(1)
    xy = rng.integers(0, 300, (400, 2))
    boxes = np.concatenate([xy, xy + rng.integers(1, 40, (400, 2))], axis=1)
    few = boxes[:30] + 7
    def brute(a, b, within):
        return sorted((i, j) for i in range(len(a)) for j in range(len(b)) if (not within or i < j)
                      and a[i, 0] < b[j, 2] and b[j, 0] < a[i, 2] and a[i, 1] < b[j, 3] and b[j, 1] < a[i, 3])
    assert sorted(zip(*(v.tolist() for v in overlapping_pairs(boxes)))) == brute(boxes, boxes, True)
    assert sorted(zip(*(v.tolist() for v in overlapping_pairs(few, boxes)))) == brute(few, boxes, False)


def test_an_edit_reaches_along_chains_of_overlapping_boxes_gone_pieces_and_changed_labels():
    earlier = {"a0": packed(0, 0, 10, 10), "b": packed(5, 5, 15, 15), "c": packed(14, 14, 20, 20),
               "d": packed(100, 100, 110, 110), "e": packed(200, 200, 210, 210), "g": packed(205, 205, 215, 215),
               "f": packed(300, 300, 310, 310), "h": packed(400, 400, 410, 410), "lost": packed(500, 500, 505, 505)}
    inst = (10.0, 0.9, 1.0, 1.0, "k")
    finals = {final_key(s, lab): inst for s, lab in [("a0", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("g", 6),
                                                     ("f", 7), ("h", 8)]}
    finals[final_key("lost", 9)] = ()  # stitched there, lost every pixel; gone now, near nothing
    entries = [
        Entry(None, 0, 1, "a1", packed(0, 0, 10, 10), new=True),  # click 1 recomputed (its piece is new)
        Entry(None, 1, 2, "b", earlier["b"]),  # overlaps the new piece
        Entry(None, 2, 3, "c", earlier["c"]),  # overlaps b only: the chain reaches it
        Entry(None, 3, 4, "d", earlier["d"]),  # far from everything: taken
        Entry(None, 4, 5, "e", earlier["e"]),  # overlaps g, which is gone (deleted click)
        Entry(None, 5, 17, "f", earlier["f"]),  # same piece, another label (its class changed)
        Entry(None, 6, 8, "h", earlier["h"]),  # taken
        Entry(None, 7, 10, "x", None),  # no piece (below threshold): neither stitched nor taken
    ]
    p = plan(entries, earlier, finals, chunk=64)
    assert p.restitch == [True, True, True, False, True, True, False, None]
    assert p.taken == 2  # d, h
    # cleared: the gone instances (a0 as 1, g, f as 7) and the re-stitched ones' earlier pixels (b, c, e)
    assert p.clear.tolist() == [1, 2, 3, 5, 6, 7]
    assert p.dirty_chunks == {(0, 0), (3, 3), (4, 4)}


def test_a_piece_reused_by_content_is_the_earlier_piece_under_its_earlier_signature():
    """A piece reused by its content key has a new signature (its read box changed) but is the earlier
    piece: it is taken when no edit reaches it, and its earlier instance is not gone."""
    earlier = {"old-box": packed(0, 0, 10, 10), "far": packed(100, 100, 110, 110)}
    finals = {final_key("old-box", 1): (10.0, 0.9, 1.0, 1.0, "k"), final_key("far", 2): (10.0, 0.9, 1.0, 1.0, "k")}
    entries = [Entry(None, 0, 1, "new-box", earlier["old-box"], earlier="old-box"),
               Entry(None, 1, 2, "far", earlier["far"])]
    p = plan(entries, earlier, finals, chunk=64)
    assert p.restitch == [False, False] and p.clear.size == 0 and not p.dirty_chunks
    # without the earlier signature it reads as a piece the earlier run never stitched, and as one gone
    p = plan([Entry(None, 0, 1, "new-box", earlier["old-box"]), entries[1]], earlier, finals, chunk=64)
    assert p.restitch == [True, False] and p.clear.tolist() == [1]
