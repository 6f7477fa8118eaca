"""Look-up-table kernels: union-find over fragment indices, and the
bucketing of streamed edges by threshold (pipeline/kernels/lut.py).
Tested against scipy and a sort-based reference (tests/test_lut.py)."""

from __future__ import annotations

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
