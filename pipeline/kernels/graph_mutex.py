"""The mutex watershed over a run's region graph, streamed into one look-up
table: the master step of the mutex partitioner.

Every edge carries a signed strength, an integer in -255..255 (uint8
affinity evidence minus a uint8 bias): positive attracts, negative repels,
0 says nothing. The mutex watershed takes edges strongest first; an
attractive edge joins its two clusters unless a repulsive edge taken
earlier keeps them apart. With 255 levels a side the order needs no sort:
the streamed edges are dealt into 510 buckets (a counting sort per chunk,
as the thresholds' buckets of pipeline/kernels/lut.py), taken from
strength 255 down to 1; at equal strength repulsion goes first (a tie
never merges), and within a bucket edges go in stream order.

Master memory: per fragment, the ids, the union-find and the mutex lists'
heads (8 + 4 + 12 bytes; twice the int sizes beyond 2^31 fragments); per
edge, 8 bytes while its bucket waits, given back when the bucket is done;
per pair of clusters kept apart, two list entries (16 bytes) and a hash
slot (8 bytes at a load between 0.35 and 0.7). A repulsive edge between
clusters already apart adds nothing. `benchmarks/scale.py --only mutex`
measures it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.kernels.compiled.graph_mutex import (EMPTY, LENGTH, LIST_FIELDS, NONE, attract, repel, resolve,
                                                   strength_buckets)
from pipeline.kernels.compiled.lut import scatter_edges
from pipeline.kernels.lut import FragmentIndex, LookUpTable

LEVELS = 255
BUCKETS = 2 * LEVELS  # and one more for strength 0, which is dropped


def order_keys(strength: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the bucket each edge is taken in, edges per bucket): bucket 0 first;
    for magnitude m, the repulsive bucket 2 (255 - m) before the attractive
    2 (255 - m) + 1; strength 0 in bucket BUCKETS, never taken."""
    strength = np.ascontiguousarray(strength)
    if strength.dtype.kind not in "iu":
        raise ValueError(f"edge strengths must be integers, not {strength.dtype}")
    keys, counts = np.empty(len(strength), dtype=np.uint16), np.empty(BUCKETS + 1, dtype=np.int64)
    if not strength_buckets(strength, LEVELS, keys, counts):
        raise ValueError(f"edge strengths must lie in -{LEVELS}..{LEVELS}")
    return keys, counts


def mutex_lut(fragments: FragmentIndex,
              edge_chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> LookUpTable:
    """The segment of every fragment: the mutex watershed over the streamed
    edges (u ids, v ids, strengths). A segment's id is its smallest fragment
    id, so never 0; a fragment no edge joins is a segment of its own."""
    if len(fragments) > 3 * 10**9:
        raise ValueError("at most 3e9 fragments (a mutex pair's key is lo * n + hi in 64 bits)")
    index_type = np.int32 if len(fragments) < 2**31 else np.int64
    buckets: list[list[np.ndarray]] = [[] for _ in range(BUCKETS)]
    repulsive = 0
    for u, v, strength in edge_chunks:
        keys, counts = order_keys(strength)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        pairs = np.empty((bounds[-2], 2), dtype=index_type)
        u, v = (np.ascontiguousarray(ids, dtype=np.uint64) for ids in (u, v))
        if not scatter_edges(u, v, keys, bounds, fragments.voxels_per_block, fragments.starts, pairs):
            raise ValueError("an edge names a fragment that is not a node")
        for k in np.flatnonzero(counts[:BUCKETS]):
            # a copy per bucket, so that a bucket's memory goes when it is done
            buckets[k].append(pairs[bounds[k] : bounds[k + 1]].copy())
        repulsive += int(counts[0:BUCKETS:2].sum())
    parent = mutex_clusters(len(fragments), buckets, repulsive, index_type)
    return LookUpTable(fragments, fragments.ids()[parent])


def mutex_clusters(n: int, buckets: list[list[np.ndarray]], repulsive: int, index_type) -> np.ndarray:
    """The mutex watershed over nodes 0..n-1, taking `buckets` in order:
    buckets[k] holds arrays of (node, node) pairs of `index_type`; even k
    repel, odd k attract (`bucket_of`). `repulsive`: the number of pairs in
    even buckets, which bounds the mutex entries. Each bucket is emptied
    once taken, so that its memory goes. Returns, per node, the smallest
    node of its cluster. The one driver of the graph (`mutex_lut`) and the
    image (pipeline/kernels/mutex.py) mutex watersheds."""
    # entry indices: two mutex entries per repulsive edge at most
    entry_type = np.int32 if 2 * repulsive < 2**31 else np.int64
    parent = np.arange(n, dtype=index_type)
    lists = np.full((n, LIST_FIELDS), NONE, dtype=entry_type)  # per node: head, tail (none), length
    lists[:, LENGTH] = 0
    other, following = np.empty(0, dtype=index_type), np.empty(0, dtype=entry_type)
    used = 0
    table, counts = np.full(16, EMPTY, dtype=np.int64), np.zeros(2, dtype=np.int64)
    for k in range(len(buckets)):
        for pairs in buckets[k]:
            if k % 2 == 0:
                if used + 2 * len(pairs) > len(other):
                    # grow by half at least: amortised copies, a modest overshoot
                    size = max(used + 2 * len(pairs), len(other) * 3 // 2)
                    other = np.concatenate([other[:used], np.empty(size - used, dtype=index_type)])
                    following = np.concatenate([following[:used], np.empty(size - used, dtype=entry_type)])
                used, table = repel(parent, pairs, lists, other, following, used, table, counts)
            else:
                table = attract(parent, pairs, lists, other, following, table, counts)
        buckets[k] = []  # taken: free it
    del table, other, following, lists
    resolve(parent, np.empty_like(parent))
    return parent
