"""The edges of an image's mutex watershed, dealt into buckets by strength
in two passes over the uint8 affinities (pipeline/kernels/mutex.py), so
that no float edge list is built and nothing is sorted: mwatershed.agglom
held a float64 weight and an internal edge per voxel and offset (2.5 GB on
a 2.4 M-voxel block and its context) and sorted them all.

An edge is a voxel p and p + offsets[c] (both inside the image, kept by
channel c's stride mask, both in the foreground) with strength
2 affs[c, p] - bias2[c], in -510..510: the sign and the order of
affs / 255 - bias exactly, for every bias that is a multiple of 1/510
(0, 0.1, ..., 0.5, ..., 1 all are). Strength 0 is no edge. Buckets as the
graph kernel's (`bucket_of`): the strongest first, repulsion before
attraction at equal strength, voxel pairs within a bucket channel by
channel, voxels in C order, in runs taken in a seeded random order
(`tie_order`; pipeline/kernels/mutex.py `edge_order` says why).
Tested against mwatershed (tests/test_mutex_kernel.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.kernels.compiled.graph_mutex import bucket_of

LEVELS = 510


@njit(cache=True, nogil=True)
def grid_edges(affs, offsets, bias2, keep, foreground, seen, pairs, first_run, run_start, run_bits, scatter) -> None:
    """affs (C, Z, Y, X) uint8, offsets (C, 3), bias2 (C,) ints in 0..510,
    keep (C, Z, Y, X) and foreground (Z, Y, X) bools; seen[k] (zeros on
    entry) += the number of edges of bucket k. Counting pass (`scatter`
    False): nothing else. Scatter pass: the j-th edge of bucket k, (p, p +
    offset) as flat voxel indices, goes to pairs[run_start[first_run[k] +
    j >> run_bits] + j % 2^run_bits] (`tie_order`): each bucket in its
    runs' shuffled order, with no pass of its own over the pairs (the
    separate shuffle took twice the time of this scatter)."""
    channels, depth, height, width = affs.shape
    within = (np.int64(1) << run_bits) - 1
    for c in range(channels):
        dz, dy, dx = offsets[c, 0], offsets[c, 1], offsets[c, 2]
        step = (dz * height + dy) * width + dx
        for z in range(max(0, -dz), min(depth, depth - dz)):
            for y in range(max(0, -dy), min(height, height - dy)):
                row = (z * height + y) * width
                for x in range(max(0, -dx), min(width, width - dx)):
                    if not keep[c, z, y, x] or not foreground[z, y, x] or not foreground[z + dz, y + dy, x + dx]:
                        continue
                    strength = 2 * np.int64(affs[c, z, y, x]) - bias2[c]
                    if strength == 0:
                        continue
                    key = bucket_of(strength, LEVELS)
                    if scatter:
                        j = seen[key]
                        at = run_start[first_run[key] + (j >> run_bits)] + (j & within)
                        pairs[at, 0] = row + x
                        pairs[at, 1] = row + x + step
                    seen[key] += 1


@njit(cache=True, nogil=True)
def _splitmix(state):
    state += np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def tie_order(bounds, seed, run_bits):
    """Where `grid_edges` puts each bucket's edges: within bucket k
    (pairs[bounds[k]:bounds[k + 1]]) runs of 2^run_bits consecutive edges
    (in channel-by-channel, C order) in a random order of the bucket's own
    (Fisher-Yates with splitmix64 from `seed`, bucket after bucket: the
    same order for the same seed on any machine). A run keeps neighbouring
    voxels together, which the union-find's memory needs. Returns
    (first_run: bucket k's runs are first_run[k]..first_run[k + 1] - 1,
    run_start: where each run's first edge goes)."""
    run = np.int64(1) << run_bits
    buckets = len(bounds) - 1
    first_run = np.zeros(buckets + 1, dtype=np.int64)
    for k in range(buckets):
        first_run[k + 1] = first_run[k] + (bounds[k + 1] - bounds[k] + run - 1) // run
    run_start = np.empty(first_run[-1], dtype=np.int64)
    order = np.empty(max(1, np.max(np.diff(first_run))), dtype=np.int64)
    state = np.uint64(seed)
    for k in range(buckets):
        low, high = bounds[k], bounds[k + 1]
        runs = first_run[k + 1] - first_run[k]
        for i in range(runs):
            order[i] = i
        if runs >= 2:
            for i in range(runs - 1, 0, -1):
                state, z = _splitmix(state)
                j = np.int64(z % np.uint64(i + 1))
                order[i], order[j] = order[j], order[i]
        at = low
        for i in range(runs):
            r = order[i]
            run_start[first_run[k] + r] = at
            at += min(high, low + (r + 1) * run) - (low + r * run)
    return first_run, run_start
