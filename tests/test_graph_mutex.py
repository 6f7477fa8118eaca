"""The graph mutex watershed of the master (pipeline/kernels/graph_mutex.py)
against mwatershed.cluster, given the same edge order."""

from __future__ import annotations

import mwatershed
import numpy as np
import pytest

from pipeline.kernels.graph_mutex import mutex_lut, order_keys
from pipeline.kernels.lut import FragmentIndex

VOXELS_PER_BLOCK = 1000


def fragment_index(rng, blocks: int) -> FragmentIndex:
    counts = rng.integers(1, 15, size=blocks)
    ids = np.concatenate([b * VOXELS_PER_BLOCK + np.arange(1, c + 1) for b, c in enumerate(counts)]).astype(np.uint64)
    return FragmentIndex.from_ids(ids, VOXELS_PER_BLOCK, blocks)


def reference(n: int, a: np.ndarray, b: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """mwatershed.cluster over node indices, edges ordered strongest first,
    repulsion before attraction at equal strength, else in stream order
    (sorted here independently of the kernel's buckets); a segment label
    per node."""
    order = np.lexsort((np.arange(len(strength)), strength > 0, -np.abs(strength)))
    edges = [(bool(strength[i] > 0), int(a[i]), int(b[i])) for i in order if strength[i] != 0]
    labels = np.arange(n)
    for node, segment in mwatershed.cluster(edges):
        labels[node] = segment
    return labels


def same_partition(x: np.ndarray, y: np.ndarray) -> bool:
    """Two labellings of the same nodes partition them alike."""
    pairs = np.unique(np.stack([x, y], axis=1), axis=0)
    return len(pairs) == len(np.unique(x)) == len(np.unique(y))


@pytest.mark.parametrize("seed", range(40))
def test_equals_mwatershed_cluster_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    fragments = fragment_index(rng, blocks=int(rng.integers(1, 5)))
    n = len(fragments)
    edges = int(rng.integers(1, 4 * n + 2))
    a, b = rng.integers(0, n, size=edges), rng.integers(0, n, size=edges)
    keep = a != b
    a, b = a[keep], b[keep]
    # few levels, so that many edges tie; zeros say nothing
    levels = int(rng.choice([3, 10, 255]))
    strength = rng.integers(-levels, levels + 1, size=len(a)).astype(np.int16)
    ids = fragments.ids()
    # streamed in chunks: the order within a bucket is the stream's
    cuts = np.sort(rng.integers(0, len(a) + 1, size=3))
    chunks = [(ids[a[s]], ids[b[s]], strength[s]) for s in np.split(np.arange(len(a)), cuts)]
    table = mutex_lut(fragments, chunks)
    expected = reference(n, a, b, strength)
    assert same_partition(np.asarray(table.segments), expected)
    # each segment is named by its smallest fragment id
    for segment in np.unique(table.segments):
        assert segment == ids[table.segments == segment].min()


def test_a_mutex_taken_earlier_keeps_clusters_apart_and_a_tie_never_merges():
    fragments = FragmentIndex.from_ids(np.arange(1, 6, dtype=np.uint64), VOXELS_PER_BLOCK, 1)
    u = np.array([1, 2, 1, 4, 4], dtype=np.uint64)
    v = np.array([2, 3, 3, 5, 5], dtype=np.uint64)
    # 1-2 join (200); 2-3 repel (150); 1-3 (100) may not join them then;
    # 4-5 attract and repel at the same strength: apart
    strength = np.array([200, -150, 100, 90, -90], dtype=np.int16)
    segments = mutex_lut(fragments, [(u, v, strength)]).segments
    assert list(segments) == [1, 1, 3, 4, 5]
    # without the repulsion, 3 joins through 1-3
    segments = mutex_lut(fragments, [(u[[0, 2]], v[[0, 2]], strength[[0, 2]])]).segments
    assert list(segments) == [1, 1, 1, 4, 5]


def test_bad_edges_are_refused():
    fragments = FragmentIndex.from_ids(np.arange(1, 4, dtype=np.uint64), VOXELS_PER_BLOCK, 1)
    one = np.ones(1, dtype=np.uint64)
    with pytest.raises(ValueError, match="strengths"):
        mutex_lut(fragments, [(one, one * 2, np.array([256]))])
    with pytest.raises(ValueError, match="strengths"):
        mutex_lut(fragments, [(one, one * 2, np.array([-256]))])
    with pytest.raises(ValueError, match="integers"):
        mutex_lut(fragments, [(one, one * 2, np.array([0.5]))])
    with pytest.raises(ValueError, match="not a node"):
        mutex_lut(fragments, [(one, one * 7, np.array([10], dtype=np.int16))])


def test_order_keys_take_strong_edges_first_and_repulsion_at_a_tie():
    keys, counts = order_keys(np.array([255, -255, 1, -1, 0, 128, 128], dtype=np.int16))
    assert list(keys) == [1, 0, 509, 508, 510, 255, 255]
    assert counts.sum() == 7 and counts[255] == 2 and counts[510] == 1


def test_edge_strengths_are_the_pair_weighted_means_of_each_class_of_offsets():
    from fractions import Fraction

    from pipeline.orchestration.segments import edge_strengths
    from pipeline.storage.graph_records import Edges

    rng = np.random.default_rng(4)
    n, channels = 300, 6
    nearest = np.array([True, True, True, False, False, False])
    # biases on the 1/510 grid (shifts of x.5 on the uint8 scale: ties to round half to even)
    biases = np.array([0.0, 0.1, 0.3, 1.0, 0.5, 0.7])
    pairs = rng.integers(0, 5, (n, channels)).astype(np.uint32)
    pairs[rng.random((n, channels)) < 0.4] = 0
    pairs[:10, :3] = 0  # linked by long-range offsets only
    pairs[10:20, 3:] = 0  # by the nearest neighbours only
    affinities = np.where(pairs > 0, rng.integers(0, 256, (n, channels)), 0).astype(np.uint8)
    u = np.arange(n, dtype=np.uint64) + 1
    v = u + 1000
    edges = Edges(u, v, {"linked": pairs > 0, "affinities": affinities, "pairs": pairs})
    got = list(edge_strengths(edges, nearest, biases))
    assert len(got) == 2
    ties = 0
    for (gu, gv, strength), members in zip(got, (nearest, ~nearest)):
        expected = {}
        for i in range(n):
            count = sum(int(pairs[i, c]) for c in range(channels) if members[c])
            if count:
                total = sum(int(pairs[i, c]) * (int(affinities[i, c]) - Fraction(biases[c] * 255).limit_denominator(2))
                            for c in range(channels) if members[c])
                expected[int(u[i])] = round(total / count)  # half to even, as np.rint
                ties += (total / count).denominator == 2
        assert strength.dtype == np.int16
        assert dict(zip(gu.tolist(), strength.tolist())) == expected
        np.testing.assert_array_equal(gv, gu + 1000)
    assert ties > 10  # means halfway between two strengths: the rounding is tested
