"""Heatmap peaks -> points, distance non-maximum suppression, and point-matching scores."""

from __future__ import annotations

import numpy as np


def heatmap_peaks(prob: np.ndarray, threshold: float, *, min_distance: int = 2, stride: int = 2
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a probability heatmap above ``threshold``, as input-pixel points.

    Parameters
    ----------
    prob : (h, w) array
        The detector's sigmoid output; heatmap pixel (r, c) covers input pixels
        ``[c * stride, (c + 1) * stride) x [r * stride, (r + 1) * stride)``.
    min_distance : int
        Peaks closer than this (heatmap pixels, Chebyshev) keep only the highest.

    Returns
    -------
    xy : (n, 2) float array
        x, y in input pixels (continuous frame: pixel (i, j) spans [j, j+1) x [i, i+1)), refined to the
        probability-weighted centre of the 3x3 neighbourhood.
    scores : (n,) float array
        The peak probabilities, in the same order (highest first).
    """
    from skimage.feature import peak_local_max

    prob = np.asarray(prob, np.float32)
    rc = peak_local_max(prob, min_distance=min_distance, threshold_abs=threshold, exclude_border=False)
    if not len(rc):
        return np.zeros((0, 2)), np.zeros(0)
    padded = np.pad(prob, 1)
    offs = np.arange(-1, 2)
    win = np.stack([padded[rc[:, 0] + 1 + dr, rc[:, 1] + 1 + dc] for dr in offs for dc in offs], 1)  # (n, 9)
    w = win / np.maximum(win.sum(1, keepdims=True), 1e-12)
    dr = (w * np.repeat(offs, 3)[None]).sum(1)
    dc = (w * np.tile(offs, 3)[None]).sum(1)
    xy = np.stack([(rc[:, 1] + dc + 0.5) * stride, (rc[:, 0] + dr + 0.5) * stride], 1)
    return xy, prob[rc[:, 0], rc[:, 1]].astype(np.float64)


def nms_points(xy: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the points kept by greedy distance NMS: highest score first, none within ``radius``.

    Only the points that have a neighbour within ``radius`` (found at once by a k-d tree: on a slide
    these are the few pairs across tile seams) go through the greedy loop.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    order = np.lexsort((xy[:, 1], xy[:, 0], -np.asarray(scores)))  # ties broken by position: deterministic
    if radius <= 0 or len(xy) < 2:
        return order
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    if not len(pairs):
        return order
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    dead = np.zeros(len(xy), bool)
    keep = []
    for i in order.tolist():
        if dead[i]:
            continue
        keep.append(i)
        dead[neighbours.get(i, [])] = True
    return np.asarray(keep, np.int64)


def f1_counts(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    """Precision, recall and F1 from the true positives and the two counts."""
    precision = tp / n_pred if n_pred else (1.0 if not n_true else 0.0)
    recall = tp / n_true if n_true else (1.0 if not n_pred else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": int(tp), "fp": int(n_pred - tp), "fn": int(n_true - tp), "precision": precision,
            "recall": recall, "f1": f1}


def match_inside(xy: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Proposals vs instance labels: a proposal matches the nucleus it falls inside, one to one.

    Two proposals in one nucleus: one matches, the other is a false positive.
    """
    ids = np.unique(labels)
    n_true = int((ids > 0).sum())
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    h, w = labels.shape
    c = np.floor(xy[:, 0]).astype(np.int64)
    r = np.floor(xy[:, 1]).astype(np.int64)
    ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    hit = labels[r[ok], c[ok]]
    tp = len(np.unique(hit[hit > 0]))
    return f1_counts(tp, len(xy), n_true)


def match_distance(xy: np.ndarray, truth: np.ndarray, radius: float) -> dict[str, float]:
    """Proposals vs true points: one-to-one matching (Hungarian) of pairs closer than ``radius``."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    truth = np.asarray(truth, np.float64).reshape(-1, 2)
    if not len(xy) or not len(truth):
        return f1_counts(0, len(xy), len(truth))
    d = cdist(xy, truth)
    cost = np.where(d <= radius, d, 1e6)
    r, c = linear_sum_assignment(cost)
    return f1_counts(int((cost[r, c] < 1e6).sum()), len(xy), len(truth))
