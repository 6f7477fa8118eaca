"""Segmentation scores against ground truth (label 0 of the ground truth is
ignored everywhere).

- VOI split = H(seg | gt), VOI merge = H(gt | seg), in bits;
- ARAND = 1 - adapted Rand F-score (the CREMI / SNEMI3D definition);
- CREMI score = sqrt(VOI_total * ARAND).

Everything is computed from a sparse contingency table that is accumulated
slab by slab, so evaluation memory does not grow with the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def contingency_pairs(segmentation: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (segment, label) pairs of two volumes, where the label is
    not 0, and the voxels of each: one table, sorted by pair."""
    labelled = ground_truth.ravel() != 0
    seg_ids, seg = np.unique(segmentation.ravel()[labelled], return_inverse=True)
    gt_ids, gt = np.unique(ground_truth.ravel()[labelled], return_inverse=True)
    # one integer key per pair: sorting int64 is far faster than sorting rows
    keys, counts = np.unique(seg.astype(np.int64) * len(gt_ids) + gt, return_counts=True)
    return seg_ids[keys // len(gt_ids)].astype(np.uint64), gt_ids[keys % len(gt_ids)].astype(np.uint64), counts


@dataclass
class Contingency:
    """Voxel counts of (segment, ground-truth label) pairs."""

    seg: list[np.ndarray] = field(default_factory=list)
    gt: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)

    def add(self, segmentation: np.ndarray, ground_truth: np.ndarray) -> None:
        self.add_table(*contingency_pairs(segmentation, ground_truth))

    def add_table(self, seg: np.ndarray, gt: np.ndarray, counts: np.ndarray) -> None:
        """Add a table of (segment, label, voxels), such as a block's
        `contingency_pairs`."""
        self.seg.append(seg)
        self.gt.append(gt)
        self.counts.append(counts)

    def compact(self) -> None:
        """Sum the parts added so far into one table: memory then holds
        one entry per distinct pair, however many parts were added."""
        seg, gt, counts = self.table()
        self.seg, self.gt, self.counts = [seg], [gt], [counts]

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.counts:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
        seg_ids, seg = np.unique(np.concatenate(self.seg), return_inverse=True)
        gt_ids, gt = np.unique(np.concatenate(self.gt), return_inverse=True)
        keys, inverse = np.unique(seg.astype(np.int64) * len(gt_ids) + gt, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(self.counts)).astype(np.int64)
        return seg_ids[keys // len(gt_ids)], gt_ids[keys % len(gt_ids)], counts


def _entropy(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _marginal(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return np.bincount(inverse.ravel(), weights=counts).astype(np.float64)


def scores(contingency: Contingency) -> dict[str, float]:
    seg, gt, counts = contingency.table()
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the ground truth has no labelled voxel in the evaluated region")
    seg_sizes, gt_sizes = _marginal(seg, counts), _marginal(gt, counts)
    joint = _entropy(counts.astype(np.float64), total)
    voi_split = joint - _entropy(gt_sizes, total)
    voi_merge = joint - _entropy(seg_sizes, total)
    # pairs of voxels, counted as n^2 - n like the SNEMI3D / skimage definition
    pairs_joint = float((counts.astype(np.float64) ** 2).sum() - total)
    pairs_seg = float((seg_sizes**2).sum() - total)
    pairs_gt = float((gt_sizes**2).sum() - total)
    arand = 1.0 - 2 * pairs_joint / (pairs_seg + pairs_gt) if pairs_seg + pairs_gt > 0 else 0.0
    voi_split, voi_merge = max(voi_split, 0.0), max(voi_merge, 0.0)
    return {
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
        "arand": arand,
        "cremi_score": math.sqrt((voi_split + voi_merge) * arand),
    }


def evaluate_arrays(segmentation: np.ndarray, ground_truth: np.ndarray) -> dict[str, float]:
    contingency = Contingency()
    contingency.add(segmentation, ground_truth)
    return scores(contingency)
