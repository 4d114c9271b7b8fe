"""Instance segmentation metrics over two integer label images.

Both images hold one integer id per object and 0 for background; ids need not be consecutive and
the two images' ids need not correspond. Every metric is derived from one sparse contingency table
(the pixel count of each overlapping ground-truth x prediction pair), built once with numpy, so a
1000 x 1000 tile with a few hundred nuclei scores in a fraction of a second.

Conventions shared by all metrics
---------------------------------
* The *best match* of a ground-truth object is the predicted object with the largest IoU with it
  (ties go to the lowest predicted id); a ground-truth object that overlaps no prediction has none.
  Several ground-truth objects may share one best match (Kumar et al.'s AJI allows this).
* When both images are empty, AJI, Dice, DQ, SQ and PQ are 1.0 (nothing to find, nothing found);
  when exactly one is empty they are 0.0. The Hausdorff distance is NaN when no ground-truth object
  has a match.

Metrics: :func:`aji`, :func:`dice`, :func:`panoptic_quality`, :func:`object_hausdorff`, and
:func:`score_all` for all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

__all__ = [
    "Contingency",
    "contingency_table",
    "aji",
    "dice",
    "panoptic_quality",
    "object_hausdorff",
    "hausdorff_per_object",
    "score_all",
]

_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Contingency:
    """Sparse GT x prediction overlap table of two label images.

    Objects are addressed by *index*: ground-truth object ``i`` has id ``gt_ids[i]`` and is drawn
    with value ``i + 1`` in ``gt_index`` (0 stays background); likewise for predictions.

    Attributes
    ----------
    gt_ids, pred_ids : numpy.ndarray
        Sorted non-zero ids present in each image, shapes ``(n_gt,)`` and ``(n_pred,)``.
    gt_area, pred_area : numpy.ndarray
        Pixel count of each object, int64, aligned with the id arrays.
    pair_gt, pair_pred : numpy.ndarray
        Object indices of every overlapping (ground truth, prediction) pair, sorted by ``pair_gt``
        then ``pair_pred``.
    pair_inter : numpy.ndarray
        Intersection (pixels) of each pair, int64, all > 0.
    gt_index, pred_index : numpy.ndarray
        The images relabelled to consecutive values ``1..n`` (int32), for bounding boxes.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray

    @property
    def n_gt(self) -> int:
        """Number of ground-truth objects."""
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        """Number of predicted objects."""
        return int(self.pred_ids.size)

    @property
    def pair_union(self) -> np.ndarray:
        """Union (pixels) of each overlapping pair, int64."""
        return self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        """IoU of each overlapping pair, float64."""
        return self.pair_inter / self.pair_union


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label images: same 2-D shape, integer (or bool) values, none negative."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: gt {gt.shape}, pred {pred.shape}")
    if gt.ndim != 2:
        raise ValueError(f"label images must be 2-D, got {gt.ndim}-D")
    for name, img in (("gt", gt), ("pred", pred)):
        if not (np.issubdtype(img.dtype, np.integer) or img.dtype == bool):
            raise TypeError(f"{name} must hold integer labels, got dtype {img.dtype}")
        if img.size and np.issubdtype(img.dtype, np.signedinteger) and img.min() < 0:
            raise ValueError(f"{name} holds negative labels")
    return gt, pred


def _relabel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ids to consecutive values (background stays 0).

    Returns
    -------
    ids : numpy.ndarray
        Sorted non-zero ids, int64.
    index : numpy.ndarray
        Flat int64 array, 0 for background and ``k + 1`` for a pixel of ``ids[k]``.
    """
    flat = img.ravel().astype(np.int64, copy=False)
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(flat.max())
    if top <= max(4 * flat.size, 1 << 20):  # ids fit a lookup table: O(N), no sort
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present)
        return np.flatnonzero(present).astype(np.int64), lut[flat]
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if ids[0] == 0:
        return ids[1:], inverse
    return ids, inverse + 1


def contingency_table(gt: np.ndarray, pred: np.ndarray) -> Contingency:
    """Build the sparse overlap table of two label images.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    Contingency
        Object ids and areas of both images and every overlapping pair with its intersection.
    """
    gt, pred = _check_pair(gt, pred)
    gt_ids, g = _relabel(gt)
    pred_ids, p = _relabel(pred)
    n_gt, n_pred = gt_ids.size, pred_ids.size
    gt_area = np.bincount(g, minlength=n_gt + 1)[1:].astype(np.int64)
    pred_area = np.bincount(p, minlength=n_pred + 1)[1:].astype(np.int64)

    both = (g > 0) & (p > 0)
    codes = (g[both] - 1) * max(n_pred, 1) + (p[both] - 1)
    if n_gt * n_pred <= 1 << 22:  # small table: dense bincount is faster than sorting
        counts = np.bincount(codes, minlength=n_gt * n_pred)
        pairs = np.flatnonzero(counts)
        inter = counts[pairs]
    else:
        pairs, inter = np.unique(codes, return_counts=True)
    shape = gt.shape
    return Contingency(
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_area=gt_area,
        pred_area=pred_area,
        pair_gt=(pairs // max(n_pred, 1)).astype(np.int64),
        pair_pred=(pairs % max(n_pred, 1)).astype(np.int64),
        pair_inter=inter.astype(np.int64),
        gt_index=g.reshape(shape).astype(np.int32),
        pred_index=p.reshape(shape).astype(np.int32),
    )


def _best_pairs(table: Contingency) -> np.ndarray:
    """Positions (into the pair arrays) of each matched GT object's max-IoU pair.

    One position per ground-truth object that overlaps any prediction, in GT order; ties in IoU go
    to the lowest predicted index.
    """
    if table.pair_gt.size == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((table.pair_pred, -table.pair_iou, table.pair_gt))
    sorted_gt = table.pair_gt[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = sorted_gt[1:] != sorted_gt[:-1]
    return order[first]


def _both_empty(table: Contingency) -> bool:
    return table.n_gt == 0 and table.n_pred == 0


def _aji(table: Contingency) -> float:
    if _both_empty(table):
        return 1.0
    best = _best_pairs(table)
    inter = int(table.pair_inter[best].sum())
    union = int(table.pair_union[best].sum())
    matched_gt = np.zeros(table.n_gt, dtype=bool)
    matched_gt[table.pair_gt[best]] = True
    used_pred = np.zeros(table.n_pred, dtype=bool)
    used_pred[table.pair_pred[best]] = True
    union += int(table.gt_area[~matched_gt].sum()) + int(table.pred_area[~used_pred].sum())
    return inter / union


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    r"""Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    For every ground-truth object :math:`G_i`, take the predicted object :math:`S_{j^*(i)}` with the
    largest IoU with it (ties: lowest predicted id). Then

    .. math::

        \mathrm{AJI} = \frac{\sum_i |G_i \cap S_{j^*(i)}|}
                            {\sum_i |G_i \cup S_{j^*(i)}| + \sum_{k \in U} |S_k|}

    where :math:`U` is the set of predicted objects chosen by no ground-truth object. As in the
    original definition, one prediction may be chosen by several ground-truth objects (its pixels
    then enter the denominator once per choice, which penalises merges). A ground-truth object that
    overlaps no prediction adds 0 to the numerator and its own area to the denominator.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    float
        AJI in [0, 1]; 1.0 when both images are empty, 0.0 when exactly one is.
    """
    return _aji(contingency_table(gt, pred))


def _dice(table: Contingency) -> float:
    total = int(table.gt_area.sum()) + int(table.pred_area.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(table.pair_inter.sum()) / total


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel Dice of the two foregrounds: ``2 |A & B| / (|A| + |B|)``, A = gt > 0, B = pred > 0.

    Instance ids are ignored.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    float
        Dice in [0, 1]; 1.0 when both foregrounds are empty.
    """
    return _dice(contingency_table(gt, pred))


def _panoptic(table: Contingency) -> dict[str, float | int]:
    # IoU > 0.5  <=>  2 * inter > union, in integers; such matches are unique on both sides.
    matched = 2 * table.pair_inter > table.pair_union
    tp = int(matched.sum())
    fp = table.n_pred - tp
    fn = table.n_gt - tp
    if _both_empty(table):
        dq = sq = 1.0
    elif tp == 0:
        dq = sq = 0.0
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(table.pair_iou[matched].sum()) / tp
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": tp, "fp": fp, "fn": fn}


def panoptic_quality(gt: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """Detection, segmentation and panoptic quality (Kirillov et al. 2019) of one image.

    A ground-truth and a predicted object match when their IoU is strictly above 0.5; such a
    match is necessarily unique on both sides. With TP matches, FP unmatched predictions and FN
    unmatched ground-truth objects: ``DQ = TP / (TP + FP/2 + FN/2)`` (the F1 score),
    ``SQ`` = mean IoU of the matches, ``PQ = DQ * SQ``.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    dict
        ``dq``, ``sq``, ``pq`` (floats) and ``tp``, ``fp``, ``fn`` (ints). When TP = 0, DQ, SQ and
        PQ are 0.0, except that all three are 1.0 when both images are empty. To pool several
        images, sum ``tp``, ``fp``, ``fn`` and ``tp * sq`` over them.
    """
    return _panoptic(contingency_table(gt, pred))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary: object pixels with a 4-neighbour outside the object (or the array)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _merge_boxes(a: tuple[slice, slice], b: tuple[slice, slice]) -> tuple[slice, ...]:
    return tuple(slice(min(s.start, t.start), max(s.stop, t.stop)) for s, t in zip(a, b))


def _pair_hausdorff(gt_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """Symmetric Hausdorff distance (px) between the boundaries of two non-empty masks."""
    a = np.argwhere(_boundary(gt_mask))
    b = np.argwhere(_boundary(pred_mask))
    return float(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))


def _hausdorff_per_object(table: Contingency) -> np.ndarray:
    """Per GT object (in ``gt_ids`` order): boundary Hausdorff to its best match, NaN if none."""
    out = np.full(table.n_gt, np.nan)
    best = _best_pairs(table)
    if best.size == 0:
        return out
    gt_boxes = ndimage.find_objects(table.gt_index, max_label=table.n_gt)
    pred_boxes = ndimage.find_objects(table.pred_index, max_label=table.n_pred)
    for gi, pi in zip(table.pair_gt[best], table.pair_pred[best]):
        box = _merge_boxes(gt_boxes[gi], pred_boxes[pi])
        out[gi] = _pair_hausdorff(
            table.gt_index[box] == gi + 1, table.pred_index[box] == pi + 1
        )
    return out


def hausdorff_per_object(gt: np.ndarray, pred: np.ndarray) -> dict[int, float]:
    """Boundary Hausdorff distance of every ground-truth object to its best match.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    dict
        Ground-truth id -> distance in pixels; NaN for an object that overlaps no prediction.
        See :func:`object_hausdorff` for the definition.
    """
    table = contingency_table(gt, pred)
    values = _hausdorff_per_object(table)
    return {int(i): float(v) for i, v in zip(table.gt_ids, values)}


def _object_hausdorff(table: Contingency) -> tuple[float, int]:
    values = _hausdorff_per_object(table)
    found = ~np.isnan(values)
    missed = int((~found).sum())
    mean = float(values[found].mean()) if found.any() else float("nan")
    return mean, missed


def object_hausdorff(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean object-level Hausdorff distance, in pixels.

    For every ground-truth object, its best match is the predicted object with the largest IoU
    (ties: lowest id). The distance of the pair is the symmetric Hausdorff distance between the two
    objects' inner boundaries, a boundary pixel being an object pixel with a 4-neighbour outside
    the object or the image; distances are between pixel centres. The result is the mean over
    matched ground-truth objects.

    A ground-truth object that overlaps no prediction is *skipped* (a finite distance would be
    arbitrary); :func:`score_all` reports how many were skipped as ``hausdorff_missed``, and
    misses are penalised by AJI and DQ. Unmatched predictions do not enter this metric.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    float
        Mean distance; NaN when no ground-truth object overlaps any prediction (including an
        empty ground truth or an empty prediction).
    """
    return _object_hausdorff(contingency_table(gt, pred))[0]


def score_all(gt: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """All metrics of this module from one contingency table.

    Parameters
    ----------
    gt, pred : numpy.ndarray
        2-D integer label images of one shape; 0 is background.

    Returns
    -------
    dict
        ``aji``, ``dice``, ``dq``, ``sq``, ``pq``, ``hausdorff`` (floats, see the functions of the
        same names), plus the counts ``tp``, ``fp``, ``fn`` (panoptic matching), ``n_gt``,
        ``n_pred`` and ``hausdorff_missed`` (ground-truth objects skipped by the Hausdorff mean).
    """
    table = contingency_table(gt, pred)
    pq = _panoptic(table)
    hd, missed = _object_hausdorff(table)
    return {
        "aji": _aji(table),
        "dice": _dice(table),
        "dq": pq["dq"],
        "sq": pq["sq"],
        "pq": pq["pq"],
        "hausdorff": hd,
        "tp": pq["tp"],
        "fp": pq["fp"],
        "fn": pq["fn"],
        "n_gt": table.n_gt,
        "n_pred": table.n_pred,
        "hausdorff_missed": missed,
    }
