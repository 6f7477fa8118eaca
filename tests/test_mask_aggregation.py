"""MaskAggr (pipeline/methods/mask_aggregation.py) against a loop over
every voxel, offset and mask, and block-wise against one pass."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.methods.mask_aggregation import (
    add_level_compiled,
    add_level_torch,
    aggregate_masks,
    held_pairs,
    mask_reach,
    window_positions,
)


def brute_force(levels, window, offsets, centre_only=False):
    """Per voxel u and offset o, every mask (of every level) whose window
    holds the level's voxels of u and u + o: the evidence-weighted mean and
    variance of min(m(u), m(u + o)), weighed by max(m(u), m(u + o));
    float64, two passes."""
    positions = window_positions(window)
    half = np.array(window) // 2
    masks0, factor0 = levels[0]
    shape = tuple(s * f for s, f in zip(masks0.shape[2:], factor0))
    mean = np.zeros((masks0.shape[0], len(offsets), *shape))
    variance = np.zeros_like(mean)
    for b, (c, offset), u in itertools.product(range(masks0.shape[0]), enumerate(offsets), np.ndindex(*shape)):
        values = []
        for masks, factor in levels[:1] if centre_only else levels:
            p = np.array(u) // factor
            q = (np.array(u) + offset) // factor
            for centre in [tuple(p)] if centre_only else np.ndindex(*masks.shape[2:]):
                dp, dq = p - centre, q - centre
                if (np.abs(dp) <= half).all() and (np.abs(dq) <= half).all():
                    m_p = float(masks[(b, positions.index(tuple(dp)), *centre)])
                    m_q = float(masks[(b, positions.index(tuple(dq)), *centre)])
                    values.append((min(m_p, m_q), max(m_p, m_q)))
        a, w = np.array(values).reshape(-1, 2).T
        if w.sum() > 0:
            mean[(b, c, *u)] = (w * a).sum() / w.sum()
            variance[(b, c, *u)] = (w * (a - mean[(b, c, *u)]) ** 2).sum() / w.sum()
    return mean, variance


def random_levels(batch, window, shape, factors, seed=0):
    """Masks in [0, 1] per level; a fifth of them all 0 (no evidence)."""
    rng = np.random.default_rng(seed)
    k = len(window_positions(window))
    levels = []
    for f in factors:
        masks = rng.random((batch, k, *(s // fi for s, fi in zip(shape, f))))
        masks *= rng.random((batch, 1, *masks.shape[2:])) > 0.2
        levels.append((torch.tensor(masks, dtype=torch.float32), f))
    return levels


CASES = {
    "2D, two levels": ((1, 3, 3), (1, 8, 8), [(1, 1, 1), (1, 2, 2)], [(0, -1, 0), (0, 0, -1), (0, -3, 0), (0, 2, -2)]),
    "3D, two levels": ((3, 3, 3), (4, 6, 6), [(1, 1, 1), (2, 2, 2)], [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 1, -3)]),
    "2D, 5 x 5 window, three levels": ((1, 5, 5), (1, 8, 8), [(1, 1, 1), (1, 2, 2), (1, 4, 4)], [(0, -1, 0), (0, -4, 3)]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("centre_only", [False, True])
def test_mean_and_variance_equal_a_loop_over_the_masks(case, centre_only):
    window, shape, factors, offsets = CASES[case]
    levels = random_levels(2, window, shape, factors)
    mean, variance = aggregate_masks(levels, window, offsets, centre_only)
    expected_mean, expected_variance = brute_force([(m.numpy(), f) for m, f in levels], window, offsets, centre_only)
    np.testing.assert_allclose(mean.numpy(), expected_mean, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), expected_variance, atol=1e-5)
    assert (variance.numpy() > 1e-3).any() != centre_only  # one mask has no spread


def test_blockwise_equals_one_pass():
    window, factors, offsets = (1, 3, 3), [(1, 1, 1), (1, 2, 2)], [(0, -1, 0), (0, 0, -1), (0, -3, 3)]
    shape = (1, 24, 24)
    levels = random_levels(1, window, shape, factors, seed=1)
    whole, whole_variance = aggregate_masks(levels, window, offsets)
    reach = mask_reach(window, factors)
    assert reach == (0, 2, 2)
    start, stop = np.array([0, 8, 8]), np.array([1, 16, 16])
    low, high = start - reach, stop + reach
    block = [(m[(slice(None), slice(None), *(slice(l // f, h // f) for l, h, f in zip(low, high, fs)))], fs)
             for m, fs in levels]
    mean, variance = aggregate_masks(block, window, offsets)
    inner = (slice(None), slice(None), *(slice(r, r + s - a) for r, a, s in zip(reach, start, stop)))
    ours = (slice(None), slice(None), *(slice(a, s) for a, s in zip(start, stop)))
    torch.testing.assert_close(mean[inner], whole[ours])
    torch.testing.assert_close(variance[inner], whole_variance[ours])


def test_bad_windows_and_levels_are_refused():
    with pytest.raises(ValueError, match="odd sizes"):
        window_positions((1, 4, 4))
    levels = random_levels(1, (1, 3, 3), (1, 8, 8), [(1, 1, 1)]) + random_levels(1, (1, 3, 3), (1, 4, 4), [(1, 2, 2)])
    with pytest.raises(ValueError, match="cover the same voxels"):
        aggregate_masks(levels, (1, 3, 3), [(0, -1, 0)])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("centre_only", [False, True])
def test_the_compiled_kernel_makes_the_torch_updates(case, centre_only):
    """The CPU kernel (pipeline/kernels/compiled/mask_aggregation.py) and
    the torch form give the same running sums, level by level."""
    window, shape, factors, offsets = CASES[case]
    levels = random_levels(2, window, tuple(s * 2 if s > 1 else s for s in shape), factors, seed=3)
    stats = {form: torch.zeros((3, 2, len(offsets), *levels[0][0].shape[2:])) for form in ("torch", "compiled")}
    for masks, factor in levels:
        pairs = held_pairs(window, factor, offsets, centre_only)
        add_level_torch(stats["torch"], masks, factor, pairs)
        add_level_compiled(stats["compiled"], masks, factor, pairs)
        torch.testing.assert_close(stats["compiled"], stats["torch"], rtol=1e-6, atol=1e-7)
    assert stats["torch"][0].max() > 0
