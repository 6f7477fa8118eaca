"""How well an uncertainty finds errors (pipeline/evaluation/uncertainty.py):
the AUC against a brute-force count of pairs, the wrong affinities against
a loop over voxel pairs, and the wrong segments and edges of a hand-built
segmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluation.uncertainty import pair_errors, roc_auc, segment_errors


def brute_auc(scores, positive) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_the_auc_counts_every_positive_negative_pair_and_ties_a_half():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(np.float16)  # many ties
        positive = rng.random(40) < 0.3
        assert roc_auc(scores, positive) == pytest.approx(brute_auc(scores, positive))
    assert roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert roc_auc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [False, False]))


def test_wrong_affinities_are_those_a_loop_over_voxel_pairs_finds():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, size=(2, 6, 7))
    offsets = [(0, -1, 0), (0, 0, -1), (-1, 0, 0), (0, 2, -3)]
    affs = rng.integers(0, 256, size=(len(offsets), *truth.shape)).astype(np.uint8)
    affs[:, :, 0] = 153  # 0.6, on the threshold: "same"
    affs[:, :, 1] = 152
    uncertainty = rng.random((len(offsets), *truth.shape)).astype(np.float16)
    scores, wrong = [], []
    for c, o in enumerate(offsets):
        for i in itertools.product(*(range(s) for s in truth.shape)):
            j = tuple(np.add(i, o))
            if any(x < 0 or x >= s for x, s in zip(j, truth.shape)) or truth[i] == 0 or truth[j] == 0:
                continue
            wrong.append((affs[c][i] / 255 >= 0.6) != (truth[i] == truth[j]))
            scores.append(uncertainty[c][i])
    result = pair_errors(affs, uncertainty, truth, offsets, threshold=0.6)
    assert result["items"] == len(wrong) and result["wrong"] == pytest.approx(np.mean(wrong))
    assert result["auc"] == pytest.approx(brute_auc(scores, wrong))


def test_wrong_segments_have_no_match_and_wrong_edges_split_one_object():
    # ground truth: objects 1 (left), 2 (middle), 3 (right) of 4 columns each, a background column
    truth = np.zeros((1, 4, 13), dtype=np.uint16)
    truth[0, :, 0:4], truth[0, :, 4:8], truth[0, :, 8:12] = 1, 2, 3
    segmentation = np.zeros_like(truth, dtype=np.uint64)
    segmentation[0, :, 0:4] = 10  # object 1, right
    segmentation[0, :2, 4:8], segmentation[0, 2:, 4:8] = 20, 21  # object 2 split in halves: IoU 0.5 each
    segmentation[0, :, 8:13] = 30  # object 3 and the background: IoU 16/20, right
    segments = [(10, 0.01), (20, 0.3), (21, 0.2), (30, 0.02)]
    edges = [(10, 20, 0.05), (20, 21, 0.4), (21, 30, 0.06)]
    result = segment_errors(segmentation, truth, segments, edges)
    assert result["segments"]["wrong"] == 0.5 and result["segments"]["auc"] == 1.0
    assert result["edges"]["wrong"] == pytest.approx(1 / 3) and result["edges"]["auc"] == 1.0
    # a merge of objects 1 and 2 is wrong too; the uncertainty ranks it last here
    merged = segmentation.copy()
    merged[0, :, 0:8] = 10
    result = segment_errors(merged, truth, [(10, 0.0), (30, 0.5)], [(10, 30, 0.1)])
    assert result["segments"]["auc"] == 0.0 and result["edges"]["wrong"] == 0.0
    # two segments of background alone belong to no object: their contact is no false split
    spurious = np.zeros_like(segmentation)
    spurious[0, :2, 12], spurious[0, 2:, 12] = 40, 41
    assert segment_errors(spurious, truth, [(40, 0.1), (41, 0.2)], [(40, 41, 0.3)])["edges"]["wrong"] == 0.0


def test_per_section_ids_name_one_object_per_section():
    # the same id 1 on two sections is two nuclei; one segment over both is a merge in 3D terms only
    truth = np.ones((2, 3, 3), dtype=np.uint16)
    segmentation = np.zeros((2, 3, 3), dtype=np.uint64)
    segmentation[0], segmentation[1] = 5, 6
    edges = [(5, 6, 0.3)]
    assert segment_errors(segmentation, truth, [(5, 0.1), (6, 0.2)], edges, per_section=True)["edges"]["wrong"] == 0.0
    assert segment_errors(segmentation, truth, [(5, 0.1), (6, 0.2)], edges, per_section=False)["edges"]["wrong"] == 1.0
