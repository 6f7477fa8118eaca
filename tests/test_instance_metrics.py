"""2D instance scores (AJI, Dice, PQ, SBD, |DiC|) against brute-force
versions written from their definitions, object by object."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.evaluation.instance_metrics import instance_scores, mean_instance_scores


def objects(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == i for i in np.unique(labels) if i != 0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def brute_aji(truth, prediction) -> float:
    gts, preds = objects(truth), objects(prediction)
    intersection = union = 0
    used = set()
    for g in gts:
        scores = [iou(g, p) for p in preds]
        if preds and max(scores) > 0:
            j = int(np.argmax(scores))
            used.add(j)
            intersection += (g & preds[j]).sum()
            union += (g | preds[j]).sum()
        else:
            union += g.sum()
    union += sum(p.sum() for j, p in enumerate(preds) if j not in used)
    return intersection / union


def brute_pq(truth, prediction) -> float:
    gts, preds = objects(truth), objects(prediction)
    matched = [(g, p) for g in gts for p in preds if iou(g, p) > 0.5]
    tp = len(matched)
    return sum(iou(g, p) for g, p in matched) / (tp + (len(preds) - tp) / 2 + (len(gts) - tp) / 2)


def brute_sbd(truth, prediction) -> float:
    gts, preds = objects(truth), objects(prediction)
    one = np.mean([max(dice(g, p) for p in preds) for g in gts])
    other = np.mean([max(dice(p, g) for g in gts) for p in preds])
    return min(one, other)


def random_instances(rng, shape, n) -> np.ndarray:
    """Blobs from random seeds, some touching, with background between."""
    seeds = np.zeros(shape, dtype=np.int64)
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = np.arange(1, n + 1)
    distance, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    labels[distance > rng.uniform(2, 6)] = 0
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_instance_scores_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = random_instances(rng, (40, 48), 12)
    # a prediction with splits, merges, misses, false positives and shifts
    prediction = np.roll(truth, rng.integers(-2, 3, 2), axis=(0, 1)) * 3
    prediction[:, :10] = np.where(prediction[:, :10] > 0, 1000, 0)  # merge the left objects
    prediction[20:, 30:] += (prediction[20:, 30:] > 0) * np.arange(18)[None, :] // 9  # split some
    prediction[rng.random(truth.shape) < 0.02] = 77  # speckle
    got = instance_scores(truth, prediction)
    foreground = (truth > 0), (prediction > 0)
    expected = {
        "aji": brute_aji(truth, prediction),
        "dice": dice(*foreground),
        "pq": brute_pq(truth, prediction),
        "sbd": brute_sbd(truth, prediction),
        "dic": abs(len(objects(prediction)) - len(objects(truth))),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert 0.1 < got["aji"] < 0.95  # a non-trivial case


def test_a_perfect_segmentation_scores_one_whatever_its_ids():
    truth = random_instances(np.random.default_rng(9), (30, 30), 8)
    relabelled = np.where(truth > 0, truth * 7 + 100, 0)
    assert instance_scores(truth, relabelled) == {"aji": 1.0, "dice": 1.0, "pq": 1.0, "sbd": 1.0, "dic": 0.0}


def test_scores_are_averaged_per_image():
    rng = np.random.default_rng(1)
    truths = [random_instances(rng, (20, 20), 4) for _ in range(3)]
    predictions = [truths[0], np.zeros_like(truths[1]), truths[2]]
    mean = mean_instance_scores(truths, predictions)
    assert mean["aji"] == pytest.approx(2 / 3)
    assert mean["dic"] == pytest.approx(len(objects(truths[1])) / 3)


def test_the_classical_baseline_splits_touching_nuclei():
    """Two overlapping bright discs on a dark background: Otsu finds them,
    the distance-transform watershed cuts them apart at the neck."""
    from pipeline.kernels.classical import otsu_watershed

    y, x = np.mgrid[:60, :90]
    truth = np.zeros((60, 90), dtype=np.int64)
    truth[(y - 30) ** 2 + (x - 30) ** 2 < 15**2] = 1
    truth[((y - 30) ** 2 + (x - 56) ** 2 < 15**2) & (truth == 0)] = 2
    image = np.where(truth > 0, 200, 20).astype(np.uint8)
    segmentation = otsu_watershed(image, min_distance=7)
    assert instance_scores(truth, segmentation)["pq"] > 0.9
    assert len(np.unique(segmentation)) == 3
