from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi

from funlib.persistence import open_ds

from pipeline.config import load_json
from pipeline.kernels.rag import edge_means, first_join_scores
from pipeline.orchestration.run_layout import RunLayout
from pipeline.storage.volumes import as_uint8
from pipeline.kernels.watershed import epsilon_agglomerate, merge_history, relabel_consecutive
from tests.conftest import REPO, noisy_ground_truth_affinities
from workers.agglomerate import compact_fragments


def brute_force_first_join(n, history, u, v):
    """Replay the merges with explicit member sets for every edge."""
    scores = []
    for x, y in zip(u, v):
        members = {i: {i} for i in range(n + 1)}
        where = {i: i for i in range(n + 1)}
        found = np.nan
        for a, b, s in history:  # regions a and b became region a
            ra, rb = where[int(a)], where[int(b)]
            merged = members.pop(ra) | members.pop(rb)
            members[ra] = merged
            if x in merged and y in merged:
                found = s
                break
        scores.append(found)
    return np.array(scores)


def assert_rag_edges_match_brute_force(labels, affs, offsets):
    """The region graph's edges and their `edge_means` (compiled kernels)
    against a pure-Python pass over every voxel pair of every offset."""
    uv, _ = merge_history(affs, labels, "hist_quant_50")
    u, v = uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64)
    means = edge_means(labels, affs, offsets, u, v)
    expected: dict[tuple[int, int], list[list[float]]] = {}
    for c, o in enumerate(offsets):
        for i in np.ndindex(labels.shape):
            j = tuple(np.add(i, o))
            if any(x < 0 or x >= s for x, s in zip(j, labels.shape)):
                continue
            a, b = int(labels[i]), int(labels[j])
            if a and b and a != b:
                expected.setdefault((min(a, b), max(a, b)), [[] for _ in offsets])[c].append(float(affs[c][i]))
    nearest = {k: val for k, val in expected.items() if any(val[c] for c in range(3))}
    assert list(zip(u.tolist(), v.tolist())) == sorted(nearest)
    for k, (a, b) in enumerate(zip(u, v)):
        for c in range(len(offsets)):
            values = nearest[(a, b)][c]
            if values:
                assert means[k, c] == pytest.approx(np.mean(values), rel=1e-6)
            else:
                assert np.isnan(means[k, c])
    return len(u)


def test_rag_edges_and_means_match_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=(4, 5, 6)).astype(np.uint64)
    # the last offset is longer than the block: it links nothing
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -2, 0), (-9, 0, 0)]
    affs = rng.integers(0, 256, size=(5, 4, 5, 6)).astype(np.uint8)
    assert_rag_edges_match_brute_force(labels, affs, offsets)


def test_rag_edges_match_brute_force_on_real_fragments(labels):
    """waterz fragments of noisy affinities of real ground-truth bodies, the
    demo's twelve offsets (up to 9 voxels), uint8 affinities as the worker
    passes them."""
    truth = open_ds(labels)[Roi((1200, 600, 600), (160, 320, 320))]
    offsets = [tuple(o) for o in load_json(REPO / "configs/train_fib25.json")["offsets"]]
    assert len(offsets) == 12
    affs = noisy_ground_truth_affinities(truth, offsets, 0.3)
    fragments, _ = relabel_consecutive(epsilon_agglomerate(affs, None, 0.1, "hist_quant_50"))
    assert 20 < fragments.max() < 2000
    assert assert_rag_edges_match_brute_force(fragments, affs, offsets) > 50


def test_first_join_scores_on_a_real_merge_history():
    rng = np.random.default_rng(2)
    affs = rng.random((3, 8, 16, 16)).astype(np.float32)
    affs = as_uint8((affs + np.roll(affs, 1, axis=2)) / 2)  # some spatial structure
    local, ids = relabel_consecutive(epsilon_agglomerate(affs, None, 0.0, "hist_quant_50"))
    uv, history = merge_history(affs, local, "hist_quant_50")
    assert len(history) > 10
    u, v = uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64)
    scores = first_join_scores(len(ids), history, u, v)
    np.testing.assert_allclose(scores, brute_force_first_join(len(ids), history, u, v), rtol=1e-6)


def test_compact_fragments_equals_sorting_the_ids():
    # a 3 x 4 x 5 grid of 4 x 5 x 6 blocks; block + context reads across
    # the volume's edge and across up to 27 blocks
    layout = RunLayout(
        voxel_size=Coordinate(1, 1, 1), roi=Roi((0, 0, 0), (12, 20, 30)), offsets=(),
        predict_output=Coordinate(1, 1, 1), predict_context=Coordinate(0, 0, 0),
        block_shape=Coordinate(4, 5, 6), context=Coordinate(2, 2, 2), partition="waterz",
    )
    rng = np.random.default_rng(3)
    fragments = np.zeros(layout.roi.shape, dtype=np.uint64)
    for index, cell in layout.blocks_meeting(layout.roi):
        window = cell.to_slices()
        fragments[window] = rng.integers(1, 40, size=cell.shape) + np.uint64(index * layout.voxels_per_block)
        fragments[window][rng.random(cell.shape) < 0.2] = 0  # no fragment
    for begin in [(-2, -2, -2), (2, 3, 4), (6, 13, 22)]:
        roi = Roi(begin, (8, 9, 10))
        block = np.zeros(roi.shape, dtype=np.uint64)
        inside = roi.intersect(layout.roi)
        block[(inside - roi.begin).to_slices()] = fragments[inside.to_slices()]
        labels, ids = compact_fragments(block, roi, layout)
        expected_ids, inverse = np.unique(block, return_inverse=True)
        np.testing.assert_array_equal(ids, expected_ids[1:])
        np.testing.assert_array_equal(labels, inverse.reshape(block.shape))


def linked_by_loop(labels, affs, offsets) -> dict:
    """{(a, b): (counts per offset, sums per offset)} by a loop over every voxel pair."""
    shape = labels.shape
    expected: dict = {}
    for c, offset in enumerate(offsets):
        for i in np.ndindex(shape):
            j = tuple(a + o for a, o in zip(i, offset))
            if not all(0 <= a < s for a, s in zip(j, shape)):
                continue
            a, b = int(labels[i]), int(labels[j])
            if a == b or a == 0 or b == 0:
                continue
            count, total = expected.setdefault((min(a, b), max(a, b)), (np.zeros(len(offsets), int), np.zeros(len(offsets))))
            count[c] += 1
            total[c] += affs[c][i]
    return expected


OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 4, -5)]


@pytest.mark.parametrize("seed", range(3))
def test_linked_edges_equal_a_loop_over_voxel_pairs(seed):
    from pipeline.kernels.rag import linked_edges

    rng = np.random.default_rng(seed)
    shape = (5, 17, 19)
    # many labels: the kernel's hash table and arrays grow several times
    labels = rng.integers(0, 400 if seed else 5, shape).astype(np.uint64)
    affs = rng.integers(0, 256, (len(OFFSETS), *shape)).astype(np.uint8)
    expected = linked_by_loop(labels, affs, OFFSETS)
    u, v, counts, sums = linked_edges(labels, affs, OFFSETS)
    assert list(zip(u.tolist(), v.tolist())) == sorted(expected)
    for e, pair in enumerate(sorted(expected)):
        np.testing.assert_array_equal(counts[e], expected[pair][0])
        np.testing.assert_array_equal(sums[e], expected[pair][1])


@pytest.mark.parametrize("seed", range(3))
def test_a_window_keeps_every_edge_of_the_labels_inside_it_whole(seed):
    """A graph block counts only the voxel pairs near its own fragments:
    each edge of a label inside the window has all its pairs, however far
    the offset reaches out of the window; pairs among labels outside it
    alone are mostly skipped."""
    from pipeline.kernels.rag import linked_edges

    rng = np.random.default_rng(seed)
    shape = (9, 17, 19)
    window = (slice(3, 7), slice(4, 12), slice(5, 14))
    labels = rng.integers(1, 60, shape).astype(np.uint64)
    # the labels inside the window are theirs alone, as a block's fragments
    labels[window] = rng.integers(100, 160, labels[window].shape)
    affs = rng.integers(0, 256, (len(OFFSETS), *shape)).astype(np.uint8)
    expected = linked_by_loop(labels, affs, OFFSETS)
    inside = [pair for pair in sorted(expected) if pair[1] >= 100]
    u, v, counts, sums = linked_edges(labels, affs, OFFSETS, window)
    found = {(a, b): e for e, (a, b) in enumerate(zip(u.tolist(), v.tolist()))}
    assert len(found) < len(expected)
    for pair in inside:
        np.testing.assert_array_equal(counts[found[pair]], expected[pair][0])
        np.testing.assert_array_equal(sums[found[pair]], expected[pair][1])


@pytest.mark.parametrize("offsets", [OFFSETS, [(-1, 0, 0), (0, -27, 0), (0, 0, -9)], [(2, 0, -3), (0, 5, 1)]])
def test_the_graph_step_reads_the_affinity_of_every_pair_with_an_end_in_its_block(offsets):
    """workers/mutex_graph.pair_anchors: a pair (i, i + offset) keeps its
    affinity at i; every such i of a pair that meets the block lies in the
    ROI the step reads affinities from."""
    from funlib.geometry import Coordinate, Roi

    from workers.mutex_graph import pair_anchors

    voxel = Coordinate(2, 3, 4)
    read = Roi((0, 0, 0), Coordinate(12, 40, 30) * voxel)
    write = Roi(Coordinate(3, 12, 9) * voxel, Coordinate(5, 14, 11) * voxel)
    part = pair_anchors(offsets, voxel)(write, read)
    inside = lambda roi, p: all(b <= x < e for b, x, e in zip(roi.begin / voxel, p, roi.end / voxel))  # noqa: E731
    needed = 0
    for offset in offsets:
        for i in np.ndindex(tuple(read.shape / voxel)):
            j = tuple(a + o for a, o in zip(i, offset))
            if inside(read, j) and (inside(write, i) or inside(write, j)):
                needed += 1
                assert inside(part, i), (offset, i)
    assert needed and part.size < read.size


def test_the_mutex_graph_gives_each_edge_its_uncertainty():
    """workers/mutex_graph.block_graph with a model's uncertainty: each
    edge's mean over the nearest-neighbour voxel pairs that link it (NaN
    for an edge only a long-range offset links), against a loop."""
    from workers.mutex_graph import block_graph

    rng = np.random.default_rng(3)
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -4, 0), (0, 0, 4)]
    labels = np.kron(rng.integers(1, 9, (3, 4, 4)), np.ones((2, 2, 3), dtype=np.int64)).astype(np.uint64)
    labels[:, :, 5] = 9  # a column whose label touches others only across it
    labels = (np.unique(labels, return_inverse=True)[1].reshape(labels.shape) + 1).astype(np.uint64)  # 1..n
    affs = rng.integers(0, 256, (len(offsets), *labels.shape), dtype=np.uint8)
    uncertainty = rng.random((len(offsets), *labels.shape)).astype(np.float16)
    ids = np.arange(1, labels.max() + 1, dtype=np.uint64) * 10
    edges = block_graph(affs, labels, ids, offsets, tuple(slice(0, s) for s in labels.shape), uncertainty)
    expected = {}
    for c, o in enumerate(offsets[:3]):
        for i in np.ndindex(*labels.shape):
            j = tuple(np.array(i) + o)
            if min(j) >= 0 and labels[i] != labels[j]:
                key = (int(min(labels[i], labels[j])) * 10, int(max(labels[i], labels[j])) * 10)
                expected.setdefault(key, []).append(float(uncertainty[(c, *i)]))
    found = {(int(a), int(b)): float(x) for a, b, x in zip(edges.u, edges.v, edges["uncertainty"])}
    assert set(expected) <= set(found) and len(found) > len(expected)  # long-range-only edges too
    for key, value in found.items():
        if key in expected:
            assert value == pytest.approx(np.mean(expected[key]), rel=1e-5)
        else:
            assert np.isnan(value)
