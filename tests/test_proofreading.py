"""The proofreading list's sums (pipeline/proofreading.py): block by
block equal to one block and to a loop over every pair across two segments."""

from __future__ import annotations

import itertools
import re

import numpy as np

from pipeline.proofreading import block_statistics, merge

OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -3, 0)]  # the last is not a nearest neighbour


def brute_force(segmentation, uncertainty, voxel_size, origin):
    """Per edge, and per segment over its edges: every nearest-neighbour
    pair (i, i + o) inside the volume with two labels, neither 0 (a
    segment's border with the background counts for neither), its
    uncertainty at i."""
    segments, edges = {}, {}
    for i in np.ndindex(*segmentation.shape):
        s = int(segmentation[i])
        if s:
            entry = segments.setdefault(s, [0, np.zeros(3), 0, 0.0])
            entry[0] += 1
            entry[1] += np.array(i) * voxel_size + origin
        for c, o in enumerate(OFFSETS[:3]):
            j = tuple(np.array(i) + o)
            if min(j) < 0:
                continue
            a, b, u = int(segmentation[i]), int(segmentation[j]), float(uncertainty[(c, *i)])
            if a == b:
                continue
            if a and b:
                for side in (a, b):
                    segments[side][2] += 1
                    segments[side][3] += u
                edge = edges.setdefault((min(a, b), max(a, b)), [0, 0.0, np.zeros(3)])
                edge[0] += 1
                edge[1] += u
                edge[2] += np.array(i) * voxel_size + origin
    return segments, edges


def test_blocks_add_up_to_a_loop_over_the_pairs_across_two_segments():
    rng = np.random.default_rng(0)
    shape, voxel_size, origin = (6, 12, 10), np.array([40.0, 4.0, 4.0]), np.array([400.0, 0.0, 8.0])
    segmentation = np.kron(rng.integers(0, 6, (3, 4, 5)), np.ones((2, 3, 2), dtype=np.int64)).astype(np.uint64)
    uncertainty = rng.random((len(OFFSETS), *shape)).astype(np.float16)
    # 2 x 2 x 2 blocks, each read with one voxel more on every side (inside the volume)
    blocks = []
    for start in itertools.product((0, 3), (0, 6), (0, 5)):
        stop = np.array(start) + (3, 6, 5)
        low, high = np.maximum(np.array(start) - 1, 0), np.minimum(stop + 1, shape)
        read = tuple(slice(a, b) for a, b in zip(low, high))
        window = tuple(slice(s - a, e - a) for s, e, a in zip(start, stop, low))
        blocks.append(block_statistics(segmentation[read], uncertainty[(slice(None), *read)], OFFSETS, window,
                                       origin + low * voxel_size, voxel_size))
    whole = block_statistics(segmentation, uncertainty, OFFSETS, tuple(slice(0, s) for s in shape), origin, voxel_size)
    segments, edges = merge(blocks)
    for blockwise, single in zip((segments, edges), merge([whole])):
        assert [row[:2] for row in blockwise] == [row[:2] for row in single]
        np.testing.assert_allclose(np.array(blockwise, dtype=np.float64), np.array(single, dtype=np.float64))
    expected_segments, expected_edges = brute_force(segmentation, uncertainty, voxel_size, origin)
    assert len(segments) == len(expected_segments) == 5 and len(edges) == len(expected_edges) > 5
    for segment, voxels, z, y, x, pairs, u in segments:
        n, where, p, total = expected_segments[segment]
        assert (voxels, pairs) == (n, p)
        np.testing.assert_allclose([z, y, x], where / n)
        np.testing.assert_allclose(u, total / p)
    for a, b, z, y, x, pairs, u in edges:
        n, total, where = expected_edges[(a, b)]
        assert pairs == n
        np.testing.assert_allclose([u, z, y, x], [total / n, *(where / n)])
    values = [row[-1] for row in segments]
    assert values == sorted(values, reverse=True)


def test_a_block_without_boundaries_adds_nothing_but_its_segment():
    one = block_statistics(np.full((2, 4, 4), 7, dtype=np.uint64), np.ones((4, 2, 4, 4), dtype=np.float16), OFFSETS,
                           (slice(0, 2), slice(0, 4), slice(0, 4)), (0, 0, 0), (1, 1, 1))
    assert merge([one]) == ([(7, 32, 0.5, 1.5, 1.5, 0, 0.0)], [])


def test_an_uncertainty_with_nan_or_out_of_range_values_is_refused_naming_them(tmp_path):
    import pytest
    from funlib.geometry import Coordinate, Roi

    from pipeline.storage.volumes import VolumeReadError, prepare_volume, read_uncertainty

    roi = Roi((0, 0, 0), (2, 8, 8))
    volume = prepare_volume(tmp_path / "run.zarr", "uncertainty", roi, Coordinate(1, 1, 1), "float16",
                            Coordinate(2, 8, 8), channels=2)
    values = np.full((2, 2, 8, 8), 0.1, dtype=np.float16)
    values[1, 1, 7, 7] = 0.25  # the largest variance of values in [0, 1]
    volume[roi] = values
    np.testing.assert_array_equal(read_uncertainty(volume, roi, "uncertainty"), values)
    for bad, shown in ((np.nan, "holds nan (1 values"), (-0.5, "holds -0.5 (1 values"), (0.5, "holds 0.5 (1 values")):
        damaged = values.copy()
        damaged[0, 0, 3, 3] = bad
        volume[roi] = damaged
        with pytest.raises(VolumeReadError, match=r"uncertainty at .* " + re.escape(shown) + r" outside \[0, 0.25\]"):
            read_uncertainty(volume, roi, "uncertainty")
