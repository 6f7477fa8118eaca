"""Region adjacency kernels: each edge's per-offset affinity sums
(pipeline/kernels/rag.py), and the hash that finds edges by key. Tested
against a pure-Python pass (tests/test_rag.py)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _pair_range(size, offset):
    # voxels i along one axis whose partner i + offset lies inside too
    start = max(0, -offset)
    return start, start + max(0, size - abs(offset))


@njit(cache=True, nogil=True)
def _pair_box(shape, offsets, c):
    """Offset c and, per axis, the voxels i whose partner i + offset lies
    inside a block of `shape`."""
    dz, dy, dx = offsets[c, 0], offsets[c, 1], offsets[c, 2]
    z0, z1 = _pair_range(shape[0], dz)
    y0, y1 = _pair_range(shape[1], dy)
    x0, x1 = _pair_range(shape[2], dx)
    return dz, dy, dx, z0, z1, y0, y1, x0, x1


# Fibonacci hashing: multiply by 2^64 / golden ratio, keep the top bits
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True)
def hash_slot(key, shift):
    return np.int64((np.uint64(key) * _GOLDEN) >> shift)


@njit(cache=True, nogil=True)
def edge_sums(labels, affs, offsets, stride, edge_keys, counts, sums) -> None:
    """For each voxel pair (i, i + offsets[c]) between labels a != b, both >
    0, whose key min(a, b) * stride + max(a, b) is in `edge_keys`:
    counts[c, e] += 1 and sums[c, e] += affs[c][i], e the key's position.
    One pass over the block for all offsets; keys are found in an
    open-addressing hash table (a binary search per pair took 2x longer).
    Channel-major sums keep one offset's accumulators close together: with
    (edge, channel) rows the pass took 1.3x longer."""
    bits = 1
    while (1 << bits) < 2 * len(edge_keys):
        bits += 1
    mask = (1 << bits) - 1
    shift = np.uint64(64 - bits)
    table = np.full(1 << bits, -1, np.int32)
    for e in range(len(edge_keys)):
        h = hash_slot(edge_keys[e], shift)
        while table[h] >= 0:
            h = (h + 1) & mask
        table[h] = e
    for c in range(offsets.shape[0]):
        dz, dy, dx, z0, z1, y0, y1, x0, x1 = _pair_box(labels.shape, offsets, c)
        for z in range(z0, z1):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    a = np.int64(labels[z, y, x])
                    b = np.int64(labels[z + dz, y + dy, x + dx])
                    if a == b or a == 0 or b == 0:
                        continue
                    key = min(a, b) * stride + max(a, b)
                    h = hash_slot(key, shift)
                    while table[h] >= 0 and edge_keys[table[h]] != key:
                        h = (h + 1) & mask
                    e = table[h]
                    if e >= 0:
                        counts[c, e] += 1
                        sums[c, e] += affs[c, z, y, x]
