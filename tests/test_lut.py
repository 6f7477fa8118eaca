from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.kernels.lut import apply_mapping, build_luts


def reference_segments(ids, u, v, scores, threshold):
    """Components by scipy, labelled with their smallest fragment id."""
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


def test_union_find_matches_connected_components_on_random_graphs():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 400))
        ids = np.unique(rng.integers(1, 10**12, size=n)).astype(np.uint64)
        n = len(ids)
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
        results = dict(build_luts(ids, chunks, thresholds))
        assert sorted(results) == [0.1, 0.5, 0.9]
        for t, segments in results.items():
            np.testing.assert_array_equal(segments, reference_segments(ids, u, v, scores, t), err_msg=f"trial {trial} t {t}")


def test_segment_id_is_smallest_fragment_and_nan_never_merges():
    ids = np.array([5, 9, 12, 40], dtype=np.uint64)
    u = np.array([9, 5, 12], dtype=np.uint64)
    v = np.array([12, 9, 40], dtype=np.uint64)
    scores = np.array([0.2, 0.4, np.nan], dtype=np.float32)
    luts = dict(build_luts(ids, [(u, v, scores)], [0.3, 1.0]))
    assert luts[0.3].tolist() == [5, 9, 9, 40]
    assert luts[1.0].tolist() == [5, 5, 5, 40]


def test_apply_mapping_keeps_background_and_unknown_ids():
    keys = np.array([3, 7, 11], dtype=np.uint64)
    mapped = np.array([3, 3, 11], dtype=np.uint64)
    volume = np.array([[0, 3, 7], [11, 12, 7]], dtype=np.uint64)
    assert apply_mapping(volume, keys, mapped).tolist() == [[0, 3, 3], [11, 12, 3]]
