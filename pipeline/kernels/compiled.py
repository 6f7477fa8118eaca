"""affseg's compiled kernels (numba), in one place.

Each replaces a numpy routine that was the measured bottleneck, and each is
tested against a slow reference (tests/test_lut.py, tests/test_rag.py). `cache=True` keeps the
machine code beside this file, so a new process does not compile again.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _find(parent, x):
    # path halving: every visited node skips its parent, so trees stay flat
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, nogil=True)
def union_edges(parent, u, v) -> None:
    """Join the components of u[i] and v[i] (node indices) in the forest
    `parent`, in place. A root is only ever hooked under a smaller one, so
    every root is the smallest index of its component and parent[i] <= i
    holds throughout (which `flatten` relies on)."""
    for i in range(len(u)):
        a = _find(parent, u[i])
        b = _find(parent, v[i])
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b


@njit(cache=True, nogil=True)
def flatten(parent) -> None:
    """Point every node at its root, in place, in one pass: with parent[i] <=
    i, parent[parent[i]] is already a root when i is reached."""
    for i in range(len(parent)):
        parent[i] = parent[parent[i]]


@njit(cache=True, nogil=True)
def _fragment_index(fragment, voxels_per_block, starts):
    # block b's ids are b * voxels_per_block + 1 .. + n_b, at indices
    # starts[b] .. starts[b + 1] - 1; -1 for an id that is not there
    if fragment == 0:
        return -1
    block = (fragment - 1) // voxels_per_block
    if block >= len(starts) - 1:
        return -1
    local = fragment - block * voxels_per_block
    if local > starts[block + 1] - starts[block]:
        return -1
    return starts[block] + local - 1


@njit(cache=True, nogil=True)
def fragment_indices(ids, voxels_per_block, starts, out) -> bool:
    """Dense index of each fragment id (`FragmentIndex`). Returns False if
    an id is not in the index (out is then incomplete)."""
    for i in range(len(ids)):
        at = _fragment_index(ids[i], voxels_per_block, starts)
        if at < 0:
            return False
        out[i] = at
    return True


@njit(cache=True, nogil=True)
def edge_buckets(scores, limits, bucket, counts) -> None:
    """bucket[i]: the first k with scores[i] <= limits[k] (limits ascending),
    len(limits) when there is none (NaN included); counts: edges per bucket."""
    counts[:] = 0
    for i in range(len(scores)):
        lo, hi = 0, len(limits)
        while lo < hi:
            mid = (lo + hi) // 2
            if scores[i] <= limits[mid]:
                hi = mid
            else:
                lo = mid + 1
        bucket[i] = lo
        counts[lo] += 1


@njit(cache=True, nogil=True)
def scatter_edges(u, v, bucket, bounds, voxels_per_block, starts, pairs) -> bool:
    """A counting sort: the fragment indices of the edges of bucket k go to
    pairs[bounds[k] : bounds[k + 1]], in stream order; edges of the last
    bucket (never merging) are dropped. False if an id is not a fragment."""
    fill = bounds[:-1].copy()
    last = len(bounds) - 2
    for i in range(len(u)):
        k = bucket[i]
        if k == last:
            continue
        a = _fragment_index(u[i], voxels_per_block, starts)
        b = _fragment_index(v[i], voxels_per_block, starts)
        if a < 0 or b < 0:
            return False
        pairs[fill[k], 0] = a
        pairs[fill[k], 1] = b
        fill[k] += 1
    return True


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


@njit(cache=True, nogil=True)
def boundary_keys(labels, offsets, stride, keys) -> int:
    """The number of voxel pairs (i, i + o), o in `offsets`, whose labels a,
    b differ and are both > 0; their keys min(a, b) * stride + max(a, b) go
    to `keys` when it is not empty (count with an empty one first)."""
    total = 0
    write = len(keys) > 0
    for c in range(offsets.shape[0]):
        dz, dy, dx, z0, z1, y0, y1, x0, x1 = _pair_box(labels.shape, offsets, c)
        for z in range(z0, z1):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    a = np.int64(labels[z, y, x])
                    b = np.int64(labels[z + dz, y + dy, x + dx])
                    if a != b and a > 0 and b > 0:
                        if write:
                            keys[total] = min(a, b) * stride + max(a, b)
                        total += 1
    return total


# Fibonacci hashing: multiply by 2^64 / golden ratio, keep the top bits
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True)
def _slot(key, shift):
    return np.int64((np.uint64(key) * _GOLDEN) >> shift)


@njit(cache=True, nogil=True)
def edge_sums(labels, affs, offsets, stride, edge_keys, counts, sums) -> None:
    """For each voxel pair (i, i + offsets[c]) between labels a != b, both >
    0, whose key min(a, b) * stride + max(a, b) is in `edge_keys`:
    counts[e, c] += 1 and sums[e, c] += affs[c][i], e the key's position.
    One pass over the block for all offsets; keys are found in an
    open-addressing hash table (a binary search per pair took 2x longer)."""
    bits = 1
    while (1 << bits) < 2 * len(edge_keys):
        bits += 1
    mask = (1 << bits) - 1
    shift = np.uint64(64 - bits)
    table = np.full(1 << bits, -1, np.int64)
    for e in range(len(edge_keys)):
        h = _slot(edge_keys[e], shift)
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
                    h = _slot(key, shift)
                    while table[h] >= 0 and edge_keys[table[h]] != key:
                        h = (h + 1) & mask
                    e = table[h]
                    if e >= 0:
                        counts[e, c] += 1
                        sums[e, c] += affs[c, z, y, x]

