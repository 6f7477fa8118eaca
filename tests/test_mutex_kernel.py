"""The n-dimensional mutex watershed (pipeline/kernels/mutex.py, compiled:
pipeline/kernels/compiled/grid_mutex.py) against mwatershed: its own
`agglom` on images whose edges all differ in strength (no tie to break),
with and without its strides, and on images with many ties against
`mwatershed.cluster` given the edges in the kernel's documented order."""

from __future__ import annotations

import itertools

import mwatershed
import numpy as np
import pytest

from pipeline.kernels.mutex import edge_order, long_range_strides, mutex_watershed, stride_mask
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


def keep_masks(shape, offsets, strides) -> list[np.ndarray]:
    return [np.ones(shape, bool) if strides is None or s is None else stride_mask(shape, o, s)
            for o, s in zip(offsets, strides or [None] * len(offsets))]


def cluster_reference(affs, offsets, biases, strides, foreground, tie_seed=0) -> np.ndarray:
    shape = affs.shape[1:]
    keep = keep_masks(shape, offsets, strides)
    ids = np.arange(np.prod(shape)).reshape(shape)
    inside = np.ones(shape, bool) if foreground is None else foreground
    strengths, us, vs = [], [], []
    for c, offset in enumerate(offsets):
        here, there = offset_pairs(shape, offset)
        use = keep[c][here] & inside[here] & inside[there]
        strengths.append(np.rint((affs[c][here] / 255.0 - biases[c])[use] * 510).astype(np.int64))
        us.append(ids[here][use])
        vs.append(ids[there][use])
    strength, u, v = (np.concatenate(x) for x in (strengths, us, vs))
    kept = strength != 0  # biases are multiples of 1/510 here: exact integers
    strength, u, v = strength[kept], u[kept], v[kept]
    pairs, bounds = edge_order(affs, offsets, biases, strides, None, foreground, tie_seed)
    # the same edges, each in the bucket of its strength: strongest first,
    # repulsion before attraction at equal strength
    expected = sorted(zip((-np.abs(strength)).tolist(), (strength > 0).tolist(), u.tolist(), v.tolist()))
    got = []
    for k in range(len(bounds) - 1):
        magnitude, attracts = 510 - k // 2, k % 2 == 1
        got += sorted((-magnitude, attracts, a, b) for a, b in pairs[bounds[k] : bounds[k + 1]].tolist())
    assert got == expected
    labels = ids.ravel().copy()
    attracting = np.zeros(len(pairs), bool)
    for k in range(len(bounds) - 1):
        attracting[bounds[k] : bounds[k + 1]] = k % 2 == 1
    for node, segment in mwatershed.cluster([(bool(a), int(x), int(y)) for a, (x, y) in zip(attracting, pairs.tolist())]):
        labels[node] = segment
    return np.where(inside, labels.reshape(shape) + 1, 0)


@pytest.mark.parametrize("dims, masked, strided", itertools.product((2, 3), (False, True), (False, True)))
def test_equals_mwatershed_cluster_in_the_kernels_order(dims, masked, strided):
    rng = np.random.default_rng(dims * 10 + masked * 2 + strided)
    offsets, shape = OFFSETS[dims], SHAPES[dims]
    # 256 values over thousands of edges: many ties
    affs = rng.integers(0, 256, (len(offsets), *shape), dtype=np.uint8)
    biases = rng.integers(153, 358, len(offsets)) / 510  # 0.3 .. 0.7
    strides = long_range_strides(offsets, (2,) * (dims - 1) + (3,)) if strided else None
    foreground = rng.random(shape) < 0.8 if masked else None
    labels = mutex_watershed(affs, offsets, biases, strides, foreground=foreground)
    assert same_partition(labels, cluster_reference(affs, offsets, biases, strides, foreground))
    if masked:
        assert (labels[~foreground] == 0).all() and (labels[foreground] > 0).all()


@pytest.mark.parametrize("dims", (2, 3))
def test_at_equal_strength_repulsion_goes_first(dims):
    # six values around the bias 0.5: attraction and repulsion of one
    # strength meet everywhere
    rng = np.random.default_rng(dims)
    offsets, shape = OFFSETS[dims], SHAPES[dims]
    affs = rng.choice(np.array([0, 50, 100, 155, 205, 255], dtype=np.uint8), (len(offsets), *shape))
    biases = [0.5] * len(offsets)
    labels = mutex_watershed(affs, offsets, biases)
    assert same_partition(labels, cluster_reference(affs, offsets, biases, None, None))


def test_ties_are_taken_in_an_order_drawn_from_the_seed():
    rng = np.random.default_rng(5)
    offsets, shape = OFFSETS[3], SHAPES[3]
    affs = rng.choice(np.array([0, 100, 200, 255], dtype=np.uint8), (len(offsets), *shape))
    biases = [0.5] * len(offsets)
    first, bounds = edge_order(affs, offsets, biases, tie_seed=7)
    again, _ = edge_order(affs, offsets, biases, tie_seed=7)
    other, other_bounds = edge_order(affs, offsets, biases, tie_seed=8)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(bounds, other_bounds)
    for k in range(len(bounds) - 1):
        run = slice(bounds[k], bounds[k + 1])
        # each strength's edges, in another order
        assert sorted(map(tuple, first[run].tolist())) == sorted(map(tuple, other[run].tolist()))
    largest = int(np.argmax(np.diff(bounds)))
    run = first[bounds[largest] : bounds[largest + 1]]
    assert (first != other).any() and not (np.diff(run[:, 0]) >= 0).all()  # shuffled, not in C order
    assert same_partition(mutex_watershed(affs, offsets, biases, tie_seed=7),
                          cluster_reference(affs, offsets, biases, None, None, tie_seed=7))


def distinct_affinities(rng, shape, offsets, keep) -> np.ndarray:
    """uint8 affinities whose kept edges all differ in |affs / 255 - 0.5|
    and are weaker than 0 and 255 (127 magnitudes a side: at most 127 kept
    edges), each attracting or repelling at random, so that no order
    between ties is in question."""
    affs = rng.integers(0, 256, (len(offsets), *shape)).astype(np.uint8)
    slots = [(c, here) for c, offset in enumerate(offsets)
             for here in [offset_pairs(shape, offset)[0]]]
    kept = sum(int(keep[c][here].sum()) for c, here in slots)
    assert 0 < kept <= 127, kept
    magnitudes = iter(rng.permutation(127)[:kept])
    for c, here in slots:
        for index in zip(*np.nonzero(keep[c][here])):
            voxel = tuple(s.start + i for s, i in zip(here, index))
            k = next(magnitudes)
            affs[(c, *voxel)] = 128 + k if rng.random() < 0.5 else 127 - k
    return affs


TIE_FREE = {2: ((7, 8), [(-1, 0), (0, -1), (-3, 2)]), 3: ((3, 4, 4), [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-1, -2, 2)])}


@pytest.mark.parametrize("dims, seed", itertools.product((2, 3), range(5)))
def test_equals_mwatershed_agglom_where_no_edges_tie(dims, seed):
    rng = np.random.default_rng(seed)
    shape, offsets = TIE_FREE[dims]
    affs = distinct_affinities(rng, shape, offsets, keep_masks(shape, offsets, None))
    labels = mutex_watershed(affs, offsets, [0.5] * len(offsets))
    theirs = mwatershed.agglom(affs / 255.0 - 0.5, [list(o) for o in offsets]).astype(np.int64)
    # mwatershed labels the voxels that joined no other 0, all of them
    alone = theirs == 0
    theirs[alone] = -np.arange(1, alone.sum() + 1)
    assert same_partition(labels, theirs)


@pytest.mark.parametrize("dims", (2, 3))
def test_strides_are_mwatershed_s_strides(dims):
    rng = np.random.default_rng(dims)
    offsets = OFFSETS[dims]
    shape = (9, 10) if dims == 2 else (4, 5, 6)
    strides = long_range_strides(offsets, (2,) * (dims - 1) + (3,))
    # the nearest neighbours all repel: the long-range edges alone decide
    # which voxels join, so the stride grid's anchor shows
    keep = keep_masks(shape, offsets, strides)
    for c, offset in enumerate(offsets):
        if strides[c] is None:
            keep[c][:] = False
    affs = distinct_affinities(rng, shape, offsets, keep)
    for c in range(len(offsets)):
        if strides[c] is None:
            affs[c] = 0
    labels = mutex_watershed(affs, offsets, [0.5] * len(offsets), strides)
    theirs = mwatershed.agglom(affs / 255.0 - 0.5, [list(o) for o in offsets],
                               strides=[s or [1] * dims for s in strides]).astype(np.int64)
    alone = theirs == 0
    assert alone.any() and not alone.all()
    theirs[alone] = -np.arange(1, alone.sum() + 1)
    assert same_partition(labels, theirs)


def test_float_affinities_and_biases_outside_0_1_are_refused():
    affs = np.zeros((2, 5, 5), dtype=np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        mutex_watershed(affs / 255.0, [(0, -1), (-1, 0)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mutex_watershed(affs, [(0, -1), (-1, 0)], [0.5, 1.5])


def test_randomised_strides_are_reproducible_and_keep_their_fraction():
    shape, offset, stride = (200, 300), (0, -9), (1, 10)
    kept = stride_mask(shape, offset, stride, np.random.default_rng([0, 5]))
    assert (kept == stride_mask(shape, offset, stride, np.random.default_rng([0, 5]))).all()
    assert (kept != stride_mask(shape, offset, stride, np.random.default_rng([0, 6]))).any()
    assert kept.mean() == pytest.approx(0.1, abs=0.01)

    rng = np.random.default_rng(1)
    offsets = OFFSETS[2]
    affs = rng.integers(0, 256, (len(offsets), 40, 40), dtype=np.uint8)
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


def flood_reference(segments, holes, affs) -> np.ndarray:
    """grow_over as a heap-based loop: offers (255 - edge affinity, the
    order they are made in, target, source) in the order flood.py documents."""
    import heapq

    labels = np.where(holes, 0, segments).astype(np.int64)
    shape = labels.shape
    heap, made = [], 0

    def offer(v):
        nonlocal made
        for axis in range(3):
            for sign in (-1, 1):
                w = list(v)
                w[axis] += sign
                if not 0 <= w[axis] < shape[axis]:
                    continue
                w = tuple(w)
                if holes[w] and labels[w] == 0:
                    # the edge of v and w is kept at the higher of the two
                    affinity = affs[axis][max(v, w)]
                    heapq.heappush(heap, (255 - int(affinity), made, w, v))
                    made += 1

    for v in zip(*np.nonzero(labels)):
        offer(tuple(int(i) for i in v))
    while heap:
        _, _, w, v = heapq.heappop(heap)
        if labels[w] == 0:
            labels[w] = labels[v]
            offer(w)
    return np.where(labels > 0, labels, segments)


@pytest.mark.parametrize("seed, levels", itertools.product(range(4), (4, 256)))
def test_growing_over_equals_a_heap_flood_in_the_documented_order(seed, levels):
    from pipeline.kernels.watershed import grow_over

    rng = np.random.default_rng(seed)
    shape = (6, 9, 11)
    # few levels: many offers tie, and the order among them decides
    affs = (rng.integers(0, levels, (3, *shape)) * (255 // (levels - 1))).astype(np.uint8)
    segments = rng.integers(1, 12, shape).astype(np.uint64)
    segments[rng.random(shape) < 0.1] = 0  # neither seed nor hole: the flood goes around
    holes = (np.isin(segments, [3, 4, 5]) | (rng.random(shape) < 0.3)) & (segments > 0)
    grown = grow_over(segments, holes, affs)
    assert grown.dtype == segments.dtype
    np.testing.assert_array_equal(grown, flood_reference(segments, holes, affs))
    # only holes change
    assert (grown[~holes] == segments[~holes]).all()
