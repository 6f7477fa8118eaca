"""2D instance scores of one image (label 0 = background in both images),
the usual ones for nuclei and cells:

- AJI: aggregated Jaccard index (Kumar et al. 2017): each ground-truth
  object is paired with the predicted object of highest IoU; intersections
  over unions summed, unused predicted objects added to the union;
- Dice: pixel-level foreground F1;
- PQ: panoptic quality, matches at IoU > 0.5: sum of matched IoUs over
  TP + FP/2 + FN/2;
- SBD: symmetric best Dice, the smaller of the two directions' mean best Dice;
- |DiC|: absolute difference in object counts.

All come from one table of overlaps between the two images' objects.
"""

from __future__ import annotations

import numpy as np

SCORES = ("aji", "dice", "pq", "sbd", "dic")


def _overlaps(truth: np.ndarray, prediction: np.ndarray):
    """Sizes of the ground-truth and predicted objects and their pairwise
    overlaps as a dense (n_truth, n_prediction) table."""
    truth_ids, t = np.unique(truth.ravel(), return_inverse=True)
    pred_ids, p = np.unique(prediction.ravel(), return_inverse=True)
    table = np.bincount(t * len(pred_ids) + p, minlength=len(truth_ids) * len(pred_ids)).reshape(len(truth_ids), len(pred_ids))
    # drop background rows and columns
    table = table[truth_ids != 0][:, pred_ids != 0]
    truth_sizes = np.bincount(t, minlength=len(truth_ids))[truth_ids != 0]
    pred_sizes = np.bincount(p, minlength=len(pred_ids))[pred_ids != 0]
    return truth_sizes, pred_sizes, table


def instance_scores(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    truth_sizes, pred_sizes, overlap = _overlaps(truth, prediction)
    union = truth_sizes[:, None] + pred_sizes[None, :] - overlap
    iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
    dice_pairs = 2 * overlap / np.maximum(truth_sizes[:, None] + pred_sizes[None, :], 1)

    # AJI: a predicted object may serve several ground-truth objects
    if len(truth_sizes) and len(pred_sizes):
        best = iou.argmax(axis=1)
        rows = np.arange(len(truth_sizes))
        matched = iou[rows, best] > 0
        intersection = overlap[rows, best][matched].sum()
        united = union[rows, best][matched].sum() + truth_sizes[~matched].sum()
        used = np.zeros(len(pred_sizes), dtype=bool)
        used[best[matched]] = True
        united += pred_sizes[~used].sum()
        aji = intersection / united if united else 1.0
    else:
        aji = 1.0 if len(truth_sizes) == len(pred_sizes) else 0.0

    foreground_truth, foreground_pred = truth != 0, prediction != 0
    both = foreground_truth.sum() + foreground_pred.sum()
    dice = 2 * (foreground_truth & foreground_pred).sum() / both if both else 1.0

    # IoU > 0.5 makes a match unique on both sides
    matches = iou > 0.5
    tp = int(matches.sum())
    fp, fn = len(pred_sizes) - tp, len(truth_sizes) - tp
    denominator = tp + fp / 2 + fn / 2
    pq = iou[matches].sum() / denominator if denominator else 1.0

    def best_dice(table: np.ndarray) -> float:
        return float(table.max(axis=1).mean()) if table.shape[0] and table.shape[1] else float(table.shape[0] == 0)

    sbd = min(best_dice(dice_pairs), best_dice(dice_pairs.T))
    return {"aji": float(aji), "dice": float(dice), "pq": float(pq), "sbd": sbd,
            "dic": float(abs(len(pred_sizes) - len(truth_sizes)))}


def mean_instance_scores(truths, predictions) -> dict[str, float]:
    """Each score averaged over images (sections)."""
    rows = [instance_scores(t, p) for t, p in zip(truths, predictions)]
    return {name: float(np.mean([r[name] for r in rows])) for name in SCORES}
