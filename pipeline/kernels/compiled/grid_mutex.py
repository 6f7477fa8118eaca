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
channel, voxels in C order, until `shuffle_buckets` takes runs of them in
a seeded random order (pipeline/kernels/mutex.py `edge_order` says why).
Tested against mwatershed (tests/test_mutex_kernel.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.kernels.compiled.graph_mutex import bucket_of

LEVELS = 510


@njit(cache=True, nogil=True)
def grid_edges(affs, offsets, bias2, keep, foreground, cursor, pairs, scatter) -> None:
    """affs (C, Z, Y, X) uint8, offsets (C, 3), bias2 (C,) ints in 0..510,
    keep (C, Z, Y, X) and foreground (Z, Y, X) bools. Counting pass
    (`scatter` False): cursor[k] += the number of edges of bucket k.
    Scatter pass: pairs[cursor[k]] <- (p, p + offset), flat voxel indices,
    cursor[k] advanced; `cursor` must hold each bucket's start."""
    channels, depth, height, width = affs.shape
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
                        at = cursor[key]
                        pairs[at, 0] = row + x
                        pairs[at, 1] = row + x + step
                    cursor[key] += 1


@njit(cache=True, nogil=True)
def _splitmix(state):
    state += np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def shuffle_buckets(pairs, bounds, seed, run) -> None:
    """Each bucket's pairs (pairs[bounds[k]:bounds[k + 1]]) in a random
    order of their own, in place, as runs of `run` consecutive pairs taken
    in a random order (Fisher-Yates with splitmix64 from `seed`: the same
    order for the same seed on any machine). A run keeps neighbouring
    voxels together, which the union-find's memory needs."""
    state = np.uint64(seed)
    scratch = np.empty_like(pairs[: max(1, np.max(np.diff(bounds)))])
    for k in range(len(bounds) - 1):
        low, high = bounds[k], bounds[k + 1]
        runs = (high - low + run - 1) // run
        if runs < 2:
            continue
        order = np.arange(runs)
        for i in range(runs - 1, 0, -1):
            state, z = _splitmix(state)
            j = np.int64(z % np.uint64(i + 1))
            order[i], order[j] = order[j], order[i]
        at = 0
        for r in order:
            start = low + r * run
            stop = min(high, start + run)
            scratch[at : at + stop - start] = pairs[start:stop]
            at += stop - start
        pairs[low:high] = scratch[: high - low]
