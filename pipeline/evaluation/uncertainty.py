"""How well a model's uncertainty (the latent-mask method's MaskAggr
variance, issue 21) finds its errors, against ground truth: areas under the
ROC curve of the uncertainty as a score for "this is wrong", at three
levels a proofreader meets them.

- pairs: every voxel pair (i, i + offset) of every affinity channel with
  both voxels labelled (> 0; label 0 is background or unknown, which the
  masks do not model); wrong where the affinity thresholded as the
  segmentation thresholds it (a mutex watershed's bias: above attracts,
  below repels) disagrees with "same label";
- segments: the proofreading list's segments (uncertainty along their
  boundary); wrong where no ground-truth object overlaps the segment with
  IoU > 0.5 (PQ's match: a split piece, a merge or a spurious segment);
- edges: the proofreading list's contacts of two segments; wrong where the
  two segments' best-overlapping ground-truth objects are one object (a
  false split, the error a merge by the proofreader mends).

An AUC of 0.5 is chance; 1 ranks every error above every correct item.
With `per_section`, each section is an image of its own (2D nuclei): a
ground-truth id names one object per section.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.metrics import contingency_pairs
from pipeline.kernels.rag import offset_pairs


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The area under the ROC curve of `scores` for `positive` (Mann-Whitney
    U over P x N, ties counted a half); NaN without both classes."""
    scores, positive = np.asarray(scores).ravel(), np.asarray(positive, dtype=bool).ravel()
    values, at = np.unique(scores, return_inverse=True)
    pos = np.bincount(at.ravel(), weights=positive, minlength=len(values))
    neg = np.bincount(at.ravel(), weights=~positive, minlength=len(values))
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives scored strictly lower
    return float((pos * (below + neg / 2)).sum() / (p * n))


def pair_errors(affs: np.ndarray, uncertainty: np.ndarray, truth: np.ndarray, offsets,
                threshold: float) -> dict[str, float]:
    """`affs` (C, Z, Y, X) uint8 (0..255 for [0, 1]), `uncertainty` of the
    same shape, `truth` (Z, Y, X) labels: the AUC of the uncertainty for
    affinities on the wrong side of `threshold` (in [0, 1]; one on it
    counts as "same"), the pairs and the fraction wrong."""
    # the uint8 levels at or above the threshold; a mutex watershed's edge
    # attracts above its bias (pipeline/kernels/mutex.py)
    level = int(np.ceil(threshold * 255))
    scores, wrong = [], []
    for c, offset in enumerate(offsets):
        here, there = offset_pairs(truth.shape, offset)
        a, b = truth[here], truth[there]
        labelled = (a > 0) & (b > 0)
        predicted_same = affs[c][here][labelled] >= level
        wrong.append(predicted_same != (a[labelled] == b[labelled]))
        scores.append(uncertainty[c][here][labelled])
    scores, wrong = np.concatenate(scores), np.concatenate(wrong)
    return {"auc": roc_auc(scores, wrong), "items": int(len(wrong)), "wrong": float(wrong.mean()) if len(wrong) else 0.0}


def _keyed(truth: np.ndarray, per_section: bool) -> np.ndarray:
    """Ground-truth ids that name one object: per section, (section, id)."""
    truth = truth.astype(np.uint64)
    if not per_section:
        return truth
    sections = np.arange(truth.shape[0], dtype=np.uint64)[:, None, None]
    return np.where(truth > 0, sections * (truth.max() + np.uint64(1)) + truth, np.uint64(0))


def _overlaps(segmentation: np.ndarray, truth: np.ndarray):
    """(segment, object, voxels) of every overlap of a segment and an object
    (both > 0), and each one's size."""
    seg_of, obj_of, counts = contingency_pairs(segmentation, truth)
    obj_ids, at = np.unique(obj_of, return_inverse=True)
    obj_sizes = np.bincount(at.ravel(), weights=counts, minlength=len(obj_ids)).astype(np.int64)
    seg_ids, seg_sizes = np.unique(segmentation[segmentation > 0], return_counts=True)
    inside = seg_of > 0
    return np.stack([seg_of[inside], obj_of[inside]], axis=1), counts[inside], \
        dict(zip(seg_ids.tolist(), seg_sizes.tolist())), dict(zip(obj_ids.tolist(), obj_sizes.tolist()))


def segment_errors(segmentation: np.ndarray, truth: np.ndarray, segments: list[tuple[int, float]],
                   edges: list[tuple[int, int, float]], per_section: bool = False) -> dict[str, dict[str, float]]:
    """The segments' and edges' AUCs: `segments` (id, uncertainty) and
    `edges` (a, b, uncertainty) as the proofreading CSVs list them."""
    pairs, counts, seg_sizes, obj_sizes = _overlaps(segmentation, _keyed(truth, per_section))
    matched: set[int] = set()  # segments with a match at IoU > 0.5
    best: dict[int, tuple[int, int]] = {}  # segment -> (its largest overlap, that object)
    for (s, o), n in zip(pairs.tolist(), counts.tolist()):
        if n / (seg_sizes[s] + obj_sizes[o] - n) > 0.5:
            matched.add(s)
        if n > best.get(s, (0, 0))[0]:
            best[s] = (n, o)
    best_object = {s: o for s, (_, o) in best.items()}
    seg_wrong = np.array([s not in matched for s, _ in segments], dtype=bool)
    seg_scores = np.array([u for _, u in segments], dtype=np.float64)
    # a segment that touches no object (all background) belongs to none
    edge_wrong = np.array([a in best_object and best_object.get(a) == best_object.get(b) for a, b, _ in edges],
                          dtype=bool)
    edge_scores = np.array([u for _, _, u in edges], dtype=np.float64)
    return {
        "segments": {"auc": roc_auc(seg_scores, seg_wrong), "items": len(segments),
                     "wrong": float(seg_wrong.mean()) if len(segments) else 0.0},
        "edges": {"auc": roc_auc(edge_scores, edge_wrong), "items": len(edges),
                  "wrong": float(edge_wrong.mean()) if len(edges) else 0.0},
    }
