from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.kernels.lut import FragmentIndex, LookUpTable, apply_mapping, build_luts


def reference_segments(ids, u, v, scores, threshold):
    """Components by scipy, labelled with their smallest fragment id: the
    slow reference of the streamed union-find."""
    index = {int(i): k for k, i in enumerate(ids)}
    keep = scores <= threshold  # NaN compares False: never merges
    rows = [index[int(x)] for x in u[keep]]
    cols = [index[int(x)] for x in v[keep]]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    smallest = {}
    for k, label in enumerate(labels):
        smallest[label] = min(smallest.get(label, ids[k]), ids[k])
    return np.array([smallest[label] for label in labels], dtype=np.uint64)


def random_fragments(rng, blocks: int, voxels_per_block: int) -> np.ndarray:
    """Fragment ids as the fragments step makes them: 1..n_b in block b,
    some blocks empty."""
    counts = rng.integers(0, 60, blocks) * (rng.random(blocks) > 0.2)
    return np.concatenate([b * voxels_per_block + np.arange(1, n + 1) for b, n in enumerate(counts)]).astype(np.uint64)


def test_streamed_tables_equal_connected_components_on_random_graphs():
    rng = np.random.default_rng(0)
    for trial in range(20):
        blocks, voxels_per_block = int(rng.integers(1, 12)), int(rng.integers(60, 10**6))
        ids = random_fragments(rng, blocks, voxels_per_block)
        n = len(ids)
        if n < 2:
            continue
        m = int(rng.integers(0, 3 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = a != b
        u, v = ids[np.minimum(a, b)[keep]], ids[np.maximum(a, b)[keep]]
        scores = rng.random(len(u)).astype(np.float32)
        scores[rng.random(len(u)) < 0.1] = np.nan
        thresholds = [0.9, 0.1, 0.5]
        # stream the edges in uneven chunks, as a store would
        cut = len(u) // 3
        chunks = [(u[:cut], v[:cut], scores[:cut]), (u[cut:], v[cut:], scores[cut:])]
        fragments = FragmentIndex.from_ids(ids, voxels_per_block, blocks)
        results = dict(build_luts(fragments, chunks, thresholds))
        assert sorted(results) == [0.1, 0.5, 0.9]
        for t, table in results.items():
            expected = reference_segments(ids, u, v, scores, t)
            np.testing.assert_array_equal(table.segments, expected, err_msg=f"trial {trial} t {t}")


def test_segment_id_is_smallest_fragment_and_nan_never_merges():
    ids = np.array([5, 9, 12, 40], dtype=np.uint64)  # one block of 100 voxels: not 1..n
    with pytest.raises(ValueError, match="not 1..n in each block"):
        FragmentIndex.from_ids(ids, 100, 1)
    ids = np.array([1, 2, 3, 101], dtype=np.uint64)
    u = np.array([2, 1, 3], dtype=np.uint64)
    v = np.array([3, 2, 101], dtype=np.uint64)
    scores = np.array([0.2, 0.4, np.nan], dtype=np.float32)
    luts = dict(build_luts(FragmentIndex.from_ids(ids, 100, 2), [(u, v, scores)], [0.3, 1.0]))
    assert luts[0.3].segments.tolist() == [1, 2, 2, 101]
    assert luts[1.0].segments.tolist() == [1, 1, 1, 101]
    # a score equal to a threshold merges at it
    equal = dict(build_luts(FragmentIndex.from_ids(ids, 100, 2), [(u[:1], v[:1], np.float32([0.3]))], [0.3]))
    assert equal[0.3].segments.tolist() == [1, 2, 2, 101]


def test_a_memory_mapped_table_relabels_as_the_whole_table(tmp_path):
    """relabel maps a block through the memory-mapped file: equal to
    mapping through the whole table in memory (apply_mapping)."""
    rng = np.random.default_rng(1)
    voxels_per_block, blocks = 1000, 9
    ids = random_fragments(rng, blocks, voxels_per_block)
    segments = rng.choice(ids, len(ids)).astype(np.uint64)
    fragments = FragmentIndex.from_ids(ids, voxels_per_block, blocks)
    LookUpTable(fragments, segments).save(tmp_path / "0.5.npy")
    table = LookUpTable.open(tmp_path / "0.5.npy")
    assert isinstance(table.segments, np.memmap)
    volume = rng.choice(np.concatenate([ids, [0]]), (7, 11, 13)).astype(np.uint64)
    np.testing.assert_array_equal(table.map(volume), apply_mapping(volume, ids, segments))
    assert table.map(np.zeros(3, np.uint64)).tolist() == [0, 0, 0]
    absent = np.setdiff1d(np.arange(1, blocks * voxels_per_block + 1, dtype=np.uint64), ids)[:1]
    with pytest.raises(ValueError, match="names a fragment that is not a node"):
        table.map(absent)


def test_apply_mapping_keeps_background_and_unknown_ids():
    keys = np.array([3, 7, 11], dtype=np.uint64)
    mapped = np.array([3, 3, 11], dtype=np.uint64)
    volume = np.array([[0, 3, 7], [11, 12, 7]], dtype=np.uint64)
    assert apply_mapping(volume, keys, mapped).tolist() == [[0, 3, 3], [11, 12, 3]]
