"""Our VOI and ARAND against scikit-image on the same inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from pipeline.evaluation.metrics import Contingency, evaluate_arrays, scores


def skimage_scores(seg, gt):
    # skimage returns (H(image1 | image0), H(image0 | image1))
    split, merge = variation_of_information(gt, seg, ignore_labels=[0])
    arand, _, _ = adapted_rand_error(gt, seg, ignore_labels=[0])
    return split, merge, arand


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_arand_match_skimage(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 8, size=(6, 30, 30))
    # a segmentation that splits and merges the ground truth in places
    seg = np.where(rng.random(gt.shape) < 0.8, gt * 3 + 1, rng.integers(1, 5, gt.shape))
    ours = evaluate_arrays(seg, gt)
    split, merge, arand = skimage_scores(seg, gt)
    assert ours["voi_split"] == pytest.approx(split, rel=1e-9, abs=1e-12)
    assert ours["voi_merge"] == pytest.approx(merge, rel=1e-9, abs=1e-12)
    assert ours["arand"] == pytest.approx(arand, rel=1e-9)
    assert ours["cremi_score"] == pytest.approx(math.sqrt((split + merge) * arand))


def test_real_ground_truth_against_a_shifted_copy():
    import h5py

    from tests.conftest import GROUNDTRUTH_H5

    with h5py.File(GROUNDTRUTH_H5) as f:
        gt = f["stack"][120:130, :100, :100].astype(np.uint64)
    seg = np.roll(gt, 2, axis=2) + 1
    ours = evaluate_arrays(seg, gt)
    split, merge, arand = skimage_scores(seg, gt)
    assert (ours["voi_split"], ours["voi_merge"], ours["arand"]) == pytest.approx((split, merge, arand), rel=1e-9)


def test_slab_accumulation_equals_one_pass_and_perfect_is_zero():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, size=(8, 20, 20))
    seg = rng.integers(1, 6, size=gt.shape)
    whole = evaluate_arrays(seg, gt)
    slabs = Contingency()
    for z in range(0, 8, 3):
        slabs.add(seg[z : z + 3], gt[z : z + 3])
    assert scores(slabs) == pytest.approx(whole)
    perfect = evaluate_arrays(gt + 10, gt)
    assert perfect["voi"] == pytest.approx(0.0, abs=1e-12) and perfect["arand"] == pytest.approx(0.0, abs=1e-12)


def test_split_and_merge_mean_what_they_say():
    gt = np.repeat(np.arange(1, 5), 50).reshape(1, 10, 20)
    halves = gt * 2 + (np.arange(20) >= 10)  # every object cut in two
    over = evaluate_arrays(halves, gt)
    assert over["voi_split"] > 0.5 and over["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    under = evaluate_arrays(np.ones_like(gt), gt)  # everything in one segment
    assert under["voi_merge"] > 1.0 and under["voi_split"] == pytest.approx(0.0, abs=1e-12)
