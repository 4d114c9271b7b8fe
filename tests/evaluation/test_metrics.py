"""Metrics against hand-computed cases, and the click-seeded baselines on a synthetic image."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from nuclick_wsi.evaluation.baselines import disk_baseline, watershed_baseline
from nuclick_wsi.evaluation.metrics import (
    aji,
    contingency_table,
    dice,
    hausdorff_per_object,
    object_hausdorff,
    panoptic_quality,
    score_all,
)


def canvas(shape: tuple[int, int] = (6, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.int32)


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Hand-computed cases. Boundaries use 4-connectivity, so every pixel of an object one or two
# pixels thick is a boundary pixel; Hausdorff distances are between pixel centres.
# --------------------------------------------------------------------------------------------


def test_perfect_match() -> None:
    gt = canvas()
    gt[1:3, 1:3] = 5  # 2x2, area 4
    gt[1:4, 5:8] = 9  # 3x3, area 9
    s = score_all(gt, gt)
    # every object is its own best match: AJI = (4+9)/(4+9) = 1, Dice 1, 2 TP with IoU 1
    assert s["aji"] == 1.0 and s["dice"] == 1.0
    assert (s["dq"], s["sq"], s["pq"]) == (1.0, 1.0, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["hausdorff"] == 0.0 and s["hausdorff_missed"] == 0


def test_aji_is_one_for_permuted_ids() -> None:
    rng = np.random.default_rng(1)
    gt = np.repeat(np.repeat(np.arange(1, 26).reshape(5, 5), 4, 0), 4, 1)  # 25 4x4 tiles
    gt[rng.random(gt.shape) < 0.1] = 0  # some background holes
    perm = np.concatenate([[0], rng.permutation(np.arange(1, 26)) * 13 + 1000])
    pred = perm[gt]
    assert aji(gt, pred) == 1.0
    assert panoptic_quality(gt, pred)["pq"] == 1.0
    assert dice(gt, pred) == 1.0


def test_half_overlap() -> None:
    gt, pred = canvas(), canvas()
    gt[2, 0:4] = 1  # row 2, columns 0-3, area 4
    pred[2, 2:6] = 1  # row 2, columns 2-5, area 4
    # intersection = columns 2-3 = 2 px, union = 6 px, IoU = 1/3
    assert aji(gt, pred) == approx(2 / 6)
    assert dice(gt, pred) == approx(2 * 2 / (4 + 4))
    # IoU 1/3 <= 0.5: no match
    assert panoptic_quality(gt, pred) == {"dq": 0.0, "sq": 0.0, "pq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    # GT column 0 -> nearest pred column 2: 2; pred column 5 -> nearest GT column 3: 2
    assert object_hausdorff(gt, pred) == approx(2.0)


def test_exactly_half_iou_is_not_a_match() -> None:
    gt, pred = canvas(), canvas()
    gt[2, 0:3] = 1  # columns 0-2
    pred[2, 1:5] = 1  # columns 1-4: inter 2, union 5, IoU 0.4
    pred2 = canvas()
    pred2[2, 0:6] = 1  # columns 0-5: inter 3, union 6, IoU exactly 0.5
    assert panoptic_quality(gt, pred)["tp"] == 0
    assert panoptic_quality(gt, pred2)["tp"] == 0


def test_split() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 0:4] = 1  # 2x4, area 8
    pred[1:3, 0:3] = 1  # 2x3, area 6: inter 6, union 8, IoU 0.75  <- best match
    pred[1:3, 3:4] = 2  # 2x1, area 2: inter 2, union 8, IoU 0.25  <- chosen by nobody
    # AJI = 6 / (8 + 2) = 0.6
    assert aji(gt, pred) == approx(0.6)
    # foregrounds identical
    assert dice(gt, pred) == 1.0
    # one TP (IoU 0.75), one FP: DQ = 1 / (1 + 0.5) = 2/3, SQ = 0.75, PQ = 0.5
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 0)
    assert pq["dq"] == approx(2 / 3) and pq["sq"] == approx(0.75) and pq["pq"] == approx(0.5)
    # GT column 3 -> pred 1 column 2: 1; pred 1 lies inside GT: 0  => 1
    assert object_hausdorff(gt, pred) == approx(1.0)


def test_merge() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 0:3] = 1  # 2x3, area 6
    gt[1:3, 3:4] = 2  # 2x1, area 2
    pred[1:3, 0:4] = 7  # 2x4, area 8: IoU 6/8 with GT 1, 2/8 with GT 2
    # both GT objects choose pred 7: AJI = (6 + 2) / (8 + 8) = 0.5 (the merge is counted twice)
    assert aji(gt, pred) == approx(0.5)
    assert dice(gt, pred) == 1.0
    # one TP (GT 1, IoU 0.75), GT 2 is a FN: DQ = 2/3, SQ = 0.75, PQ = 0.5
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 0, 1)
    assert pq["pq"] == approx(0.5)
    # GT 1: pred column 3 -> GT column 2: 1.  GT 2 (column 3): pred column 0 -> column 3: 3.
    assert hausdorff_per_object(gt, pred) == {1: approx(1.0), 2: approx(3.0)}
    assert object_hausdorff(gt, pred) == approx(2.0)


def test_missed_object() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 1:3] = 1  # 2x2, area 4, predicted exactly
    gt[4, 7:9] = 2  # area 2, not predicted
    pred[1:3, 1:3] = 3
    # AJI = 4 / (4 + 2): the missed object adds its area to the union
    assert aji(gt, pred) == approx(4 / 6)
    assert dice(gt, pred) == approx(2 * 4 / (6 + 4))
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 0, 1)
    assert pq["dq"] == approx(2 / 3) and pq["sq"] == 1.0 and pq["pq"] == approx(2 / 3)
    # the missed object is skipped by the Hausdorff mean and counted
    s = score_all(gt, pred)
    assert s["hausdorff"] == 0.0 and s["hausdorff_missed"] == 1
    assert math.isnan(hausdorff_per_object(gt, pred)[2])


def test_false_positive() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 1:3] = 1  # area 4
    pred[1:3, 1:3] = 1
    pred[4, 6:9] = 2  # area 3, no GT
    # AJI = 4 / (4 + 3): the unused prediction adds its area to the union
    assert aji(gt, pred) == approx(4 / 7)
    assert dice(gt, pred) == approx(2 * 4 / (4 + 7))
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 0)
    assert pq["pq"] == approx(2 / 3)
    assert object_hausdorff(gt, pred) == 0.0


def test_shifted_square_hausdorff() -> None:
    gt, pred = canvas((8, 8)), canvas((8, 8))
    gt[1:4, 1:4] = 1  # 3x3, boundary = ring of 8, centre (2, 2) inside
    pred[1:4, 2:5] = 1  # shifted right by one column
    # every boundary pixel of one has a boundary pixel of the other within 1 px
    assert object_hausdorff(gt, pred) == approx(1.0)
    # inter 6, union 12: IoU 0.5 exactly -> no PQ match; AJI 6/12
    assert aji(gt, pred) == approx(0.5)
    assert panoptic_quality(gt, pred)["tp"] == 0


def test_empty_prediction() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 1:3] = 1
    gt[4, 5:9] = 2
    s = score_all(gt, pred)
    # AJI = 0 / (4 + 4); Dice = 0 / 8
    assert s["aji"] == 0.0 and s["dice"] == 0.0
    assert (s["dq"], s["sq"], s["pq"]) == (0.0, 0.0, 0.0)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 2)
    assert math.isnan(s["hausdorff"]) and s["hausdorff_missed"] == 2


def test_empty_ground_truth() -> None:
    gt, pred = canvas(), canvas()
    pred[1:3, 1:3] = 4
    s = score_all(gt, pred)
    # AJI = 0 / 4 (unused prediction in the union)
    assert s["aji"] == 0.0 and s["dice"] == 0.0 and s["pq"] == 0.0
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 0)
    assert math.isnan(s["hausdorff"]) and s["hausdorff_missed"] == 0


def test_both_empty() -> None:
    s = score_all(canvas(), canvas())
    assert (s["aji"], s["dice"], s["dq"], s["sq"], s["pq"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 0)
    assert math.isnan(s["hausdorff"])


def test_aji_tie_goes_to_lowest_prediction_id() -> None:
    gt, pred = canvas(), canvas()
    gt[1:3, 0:4] = 1  # area 8
    pred[1:3, 0:2] = 2  # IoU 4/8
    pred[1:3, 2:4] = 1  # IoU 4/8 as well; id 1 is chosen, id 2 is unused
    # AJI = 4 / (8 + 4) either way, by symmetry
    assert aji(gt, pred) == approx(4 / 12)
    assert hausdorff_per_object(gt, pred)[1] == approx(2.0)  # columns 0-1 of GT to pred 1


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        aji(canvas((4, 4)), canvas((4, 5)))
    with pytest.raises(TypeError):
        dice(np.zeros((3, 3)), canvas((3, 3)))
    with pytest.raises(ValueError):
        dice(-np.ones((3, 3), np.int32), canvas((3, 3)))


def _naive_aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Loop-over-objects AJI, straight from Kumar et al.'s algorithm."""
    inter_sum = union_sum = 0
    used: set[int] = set()
    for g in np.unique(gt[gt > 0]):
        gm = gt == g
        best, best_iou = None, 0.0
        for p in np.unique(pred[gm & (pred > 0)]):
            pm = pred == p
            iou = (gm & pm).sum() / (gm | pm).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            union_sum += gm.sum()
        else:
            pm = pred == best
            inter_sum += (gm & pm).sum()
            union_sum += (gm | pm).sum()
            used.add(int(best))
    for p in np.unique(pred[pred > 0]):
        if int(p) not in used:
            union_sum += (pred == p).sum()
    return inter_sum / union_sum


def _random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    from scipy import ndimage

    seeds = np.zeros(shape, np.int32)
    ys, xs = rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)
    seeds[ys, xs] = rng.choice(np.arange(1, 10 * n), size=n, replace=False)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    labels[dist > rng.uniform(2, 5)] = 0
    return labels


def test_vectorised_aji_and_pq_match_loops() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        gt = _random_labels(rng, (40, 40), 15)
        pred = _random_labels(rng, (40, 40), 18)
        assert aji(gt, pred) == approx(_naive_aji(gt, pred))
        tp = 0
        for g in np.unique(gt[gt > 0]):
            for p in np.unique(pred[pred > 0]):
                a, b = gt == g, pred == p
                tp += int(2 * (a & b).sum() > (a | b).sum())
        assert panoptic_quality(gt, pred)["tp"] == tp


def test_contingency_table_counts() -> None:
    gt, pred = canvas(), canvas()
    gt[0:2, 0:4] = 10
    pred[0:2, 0:2] = 3
    pred[1:3, 2:5] = 8
    t = contingency_table(gt, pred)
    assert t.gt_ids.tolist() == [10] and t.pred_ids.tolist() == [3, 8]
    assert t.gt_area.tolist() == [8] and t.pred_area.tolist() == [4, 6]
    assert t.pair_inter.tolist() == [4, 2]  # pred 8 overlaps GT at row 1, columns 2-3


def test_large_tile_is_fast() -> None:
    rng = np.random.default_rng(3)
    gt = _random_labels(rng, (1000, 1000), 500)
    pred = _random_labels(rng, (1000, 1000), 500)
    pred[gt > 0] = np.where(pred[gt > 0] > 0, pred[gt > 0], gt[gt > 0] + 100_000)
    start = time.perf_counter()
    s = score_all(gt, pred)
    elapsed = time.perf_counter() - start
    assert 0.0 <= s["aji"] <= 1.0 and s["n_gt"] > 400
    assert elapsed < 3.0  # about 0.1-0.3 s; loose bound on a shared 2-core machine


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def _two_blob_image() -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """40x60 light background with two dark hematoxylin-coloured discs; returns rgb, truth, clicks."""
    yy, xx = np.mgrid[:40, :60]
    truth = np.zeros((40, 60), np.int32)
    truth[(yy - 15) ** 2 + (xx - 15) ** 2 <= 36] = 1  # radius 6 at (x=15, y=15)
    truth[(yy - 25) ** 2 + (xx - 42) ** 2 <= 64] = 2  # radius 8 at (x=42, y=25)
    rgb = np.empty((40, 60, 3), np.uint8)
    rgb[:] = (236, 226, 232)
    rgb[truth > 0] = (75, 55, 140)
    return rgb, truth, [(16, 14), (40, 27)]


def test_disk_baseline() -> None:
    labels = disk_baseline((20, 30, 3), [(5, 5), (12, 5)], radius=4)
    assert labels.shape == (20, 30) and labels.dtype == np.int32
    assert labels[5, 5] == 1 and labels[5, 12] == 2
    assert labels[5, 8] == 1 and labels[5, 9] == 2  # nearest click wins where disks overlap
    assert labels[9, 5] == 1 and labels[10, 5] == 0  # radius 4 inclusive
    assert set(np.unique(labels)) == {0, 1, 2}
    assert not disk_baseline((8, 8), []).any()
    with pytest.raises(ValueError):
        disk_baseline((8, 8), [(8, 0)])


def test_watershed_baseline_on_two_blobs() -> None:
    rgb, truth, clicks = _two_blob_image()
    labels = watershed_baseline(rgb, clicks)
    assert labels.shape == truth.shape and labels.dtype == np.int32
    for k, (x, y) in enumerate(clicks, start=1):
        assert labels[y, x] == k  # contains its click
        blob = truth == k
        covered = (labels == k) & blob
        assert covered.sum() >= 0.9 * blob.sum()  # covers its blob
        assert ((labels == k) & ~blob).sum() <= 0.2 * blob.sum()  # and little else
    assert score_all(truth, labels)["aji"] > 0.8


def test_watershed_baseline_ignores_unclicked_blob_and_background_click() -> None:
    rgb, truth, clicks = _two_blob_image()
    labels = watershed_baseline(rgb, [clicks[0], (55, 3)], elevation="distance")
    assert not labels[truth == 2].any()  # the unclicked blob stays background
    assert labels[3, 55] == 2 and (labels == 2).sum() == 1  # a background click: its own pixel
    assert (labels == 1).sum() >= 0.9 * (truth == 1).sum()


def test_disk_baseline_scores_below_watershed_on_blobs() -> None:
    rgb, truth, clicks = _two_blob_image()
    disk = disk_baseline(rgb.shape, clicks, radius=3)
    assert score_all(truth, disk)["aji"] < score_all(truth, watershed_baseline(rgb, clicks))["aji"]
