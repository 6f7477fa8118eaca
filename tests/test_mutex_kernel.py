"""The n-dimensional mutex watershed (pipeline/kernels/mutex.py) against
references built another way: mwatershed's own strides, and a graph of the
kept edges only, clustered edge by edge by `mwatershed.cluster_edges`."""

from __future__ import annotations

import itertools

import mwatershed
import numpy as np
import pytest

from pipeline.kernels.mutex import long_range_strides, mutex_watershed, stride_mask
from pipeline.kernels.rag import offset_pairs

OFFSETS = {
    2: [(-1, 0), (0, -1), (-3, 0), (0, -3), (-2, 2), (4, 1)],
    3: [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 0, 3), (-1, -2, 2)],
}
SHAPES = {2: (23, 31), 3: (7, 11, 13)}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """One label of `a` per label of `b` and back (0 only where 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def reference(affs, offsets, biases, keep, foreground) -> np.ndarray:
    """Mutex watershed of the graph that holds the kept edges between
    foreground voxels and nothing else, by `mwatershed.cluster_edges`."""
    shape = affs.shape[1:]
    ids = np.arange(1, np.prod(shape) + 1).reshape(shape)
    inside = np.ones(shape, bool) if foreground is None else foreground
    edges = []
    for c, offset in enumerate(offsets):
        here, there = offset_pairs(shape, offset)
        use = keep[c][here] & inside[here] & inside[there]
        weight = (affs[c][here] - biases[c])[use]
        edges += zip(weight.tolist(), ids[here][use].tolist(), ids[there][use].tolist())
    segment = dict(mwatershed.cluster_edges(edges))
    labels = np.vectorize(lambda i: segment.get(i, i))(ids)
    return np.where(inside, labels, 0)


@pytest.mark.parametrize("dims, masked, strided", itertools.product((2, 3), (False, True), (False, True)))
def test_equals_a_graph_of_the_kept_edges(dims, masked, strided):
    rng = np.random.default_rng(dims * 10 + masked * 2 + strided)
    offsets, shape = OFFSETS[dims], SHAPES[dims]
    affs = rng.random((len(offsets), *shape))
    biases = rng.uniform(0.3, 0.7, len(offsets))
    strides = long_range_strides(offsets, (2,) * (dims - 1) + (3,)) if strided else None
    foreground = rng.random(shape) < 0.8 if masked else None
    labels = mutex_watershed(affs, offsets, biases, strides, foreground=foreground)
    keep = [np.ones(shape, bool) if strides is None or s is None else stride_mask(shape, o, s)
            for o, s in zip(offsets, strides or [None] * len(offsets))]
    assert same_partition(labels, reference(affs, offsets, biases, keep, foreground))
    if masked:
        assert (labels[~foreground] == 0).all() and (labels[foreground] > 0).all()


@pytest.mark.parametrize("dims", (2, 3))
def test_strides_are_mwatershed_s_strides(dims):
    rng = np.random.default_rng(dims)
    offsets, shape = OFFSETS[dims], SHAPES[dims]
    affs = rng.random((len(offsets), *shape))
    strides = long_range_strides(offsets, (2,) * (dims - 1) + (3,))
    labels = mutex_watershed(affs, offsets, [0.5] * len(offsets), strides)
    theirs = mwatershed.agglom(affs - 0.5, [list(o) for o in offsets],
                               strides=[s or [1] * dims for s in strides]).astype(np.int64)
    # mwatershed labels the voxels that joined no other 0, all of them
    alone = theirs == 0
    assert alone.any()
    theirs[alone] = -np.arange(1, alone.sum() + 1)
    assert same_partition(labels, theirs)


def test_randomised_strides_are_reproducible_and_keep_their_fraction():
    shape, offset, stride = (200, 300), (0, -9), (1, 10)
    kept = stride_mask(shape, offset, stride, np.random.default_rng([0, 5]))
    assert (kept == stride_mask(shape, offset, stride, np.random.default_rng([0, 5]))).all()
    assert (kept != stride_mask(shape, offset, stride, np.random.default_rng([0, 6]))).any()
    assert kept.mean() == pytest.approx(0.1, abs=0.01)

    rng = np.random.default_rng(1)
    offsets = OFFSETS[2]
    affs = rng.random((len(offsets), 40, 40))
    strides = long_range_strides(offsets, (3, 3))
    runs = [mutex_watershed(affs, offsets, [0.5] * len(offsets), strides, np.random.default_rng([7, z]))
            for z in (0, 0, 1)]
    assert (runs[0] == runs[1]).all() and not same_partition(runs[0], runs[2])


def test_nearest_neighbours_keep_every_edge():
    assert long_range_strides([(0, -1, 0), (-1, 0, 0), (0, -3, 0), (-1, -1, 0)], (1, 10, 10)) == [
        None, None, [1, 10, 10], [1, 10, 10]]
    assert long_range_strides([(0, -1, 0)], None) is None


def test_small_segments_are_grown_over_by_their_neighbours():
    from pipeline.kernels.watershed import grow_over

    segments = np.ones((1, 20, 30), dtype=np.uint64)
    segments[..., 15:] = 2
    segments[0, 5:8, 3:6] = 3  # inside 1
    segments[0, 10:13, 13:17] = 4  # across the border of 1 and 2
    affs = np.full((3, 1, 20, 30), 255, dtype=np.uint8)
    affs[:, :, :, 15] = 0  # the boundary between 1 and 2
    holes = np.isin(segments, [3, 4])
    grown = grow_over(segments, holes, affs)
    assert set(np.unique(grown)) == {1, 2}
    assert (grown[0, 5:8, 3:6] == 1).all()
    # the boundary stays where the affinities put it
    assert (grown[0, 10:13, 13:15] == 1).all() and (grown[0, 10:13, 15:17] == 2).all()
    # a hole no other segment reaches keeps its label: no voxel is left without one
    alone = np.full((1, 4, 4), 7, dtype=np.uint64)
    assert (grow_over(alone, alone == 7, affs[:, :, :4, :4]) == 7).all()
