"""The mutex watershed over a graph (Wolf et al.), one bucket of edges at a
time (pipeline/kernels/graph_mutex.py). Tested against
`mwatershed.cluster`, decision for decision (tests/test_graph_mutex.py).

State, all arrays of node indices:

- `parent`: the union-find forest.
- the mutexes, twice: a hash set of cluster pairs (`table`: open
  addressing, linear probing, keys lo * n + hi of the two roots), so that
  "may these two clusters join?" costs one look-up however large they
  are; and each root's singly linked list of entries (`lists`: head,
  tail and length per node; `other`, `following` per entry), each holding a node
  of a cluster that may never join this one, so that a join can re-key
  the pairs of the cluster that goes under. The root with the shorter list
  goes under (its pairs are re-keyed, duplicates dropped from the list),
  so each pair is re-keyed O(log n) times in all, and no entry is ever
  rewritten for a join elsewhere: which cluster an entry's node is in now
  is found through `parent`.

Joins hook the shorter list's root under the other, not the smaller index
under the larger, so `resolve` (not lut.flatten) reads the forest out.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.kernels.compiled.lut import _find
from pipeline.kernels.compiled.prefetch import prefetch

NONE = -1  # an empty list, or the end of one
HEAD, TAIL, LENGTH = 0, 1, 2  # the columns of `lists`: a root's list, in one cache line
LIST_FIELDS = 3
EMPTY, DELETED = -1, -2  # hash slots
LOAD = 0.7  # the table grows when its filled slots pass this share
MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / phi: multiplied, the key's bits spread over the word


@njit(cache=True, nogil=True)
def bucket_of(s, levels):
    """The bucket an edge of strength s is taken in, 0 first: for magnitude
    m, the repulsive 2 (levels - m) before the attractive 2 (levels - m) + 1;
    strength 0 in the last bucket, 2 levels (never taken)."""
    if s > 0:
        return 2 * (levels - s) + 1
    if s < 0:
        return 2 * (levels + s)
    return 2 * levels


@njit(cache=True, nogil=True)
def strength_buckets(strength, levels, keys, counts) -> bool:
    """keys[i]: the bucket of edge i (`bucket_of`). counts: edges per
    bucket. False if a strength lies outside -levels..levels."""
    counts[:] = 0
    for i in range(len(strength)):
        s = strength[i]
        if s > levels or s < -levels:
            return False
        key = bucket_of(s, levels)
        keys[i] = key
        counts[key] += 1
    return True


@njit(cache=True, nogil=True)
def class_strengths(pairs, affinities, shift, members, levels, strength, has) -> None:
    """Per edge i, over the channels c in `members`: the pair-weighted mean
    of affinities[i, c] - shift[c] (pairs (E, C) uint32, affinities (E, C)
    uint8 means), rounded half to even and clipped to -levels..levels, into
    strength[i]; has[i]: some member channel links the edge. One pass, no
    (E, C) temporaries (numpy's took 0.45 s of the bench's 0.8 s master
    step)."""
    for i in range(pairs.shape[0]):
        count = np.int64(0)
        total = 0.0
        for c in range(pairs.shape[1]):
            if members[c] and pairs[i, c] > 0:
                count += np.int64(pairs[i, c])
                total += np.float64(pairs[i, c]) * (np.float64(affinities[i, c]) - shift[c])
        has[i] = count > 0
        if count > 0:
            strength[i] = min(levels, max(-levels, np.int64(np.rint(total / count))))


@njit(cache=True, nogil=True)
def _key(a, b, n):
    lo, hi = (a, b) if a < b else (b, a)
    return np.int64(lo) * np.int64(n) + np.int64(hi)


@njit(cache=True, nogil=True)
def _home(table, key):
    # the multiplied key's high half folded onto its low bits, masked to the
    # table (a power of two): no logarithm of the size per probe
    h = np.uint64(key) * MIX
    return np.int64((h ^ (h >> np.uint64(32))) & np.uint64(len(table) - 1))


@njit(cache=True, nogil=True)
def _contains(table, key) -> bool:
    mask = len(table) - 1
    at = _home(table, key)
    while table[at] != EMPTY:
        if table[at] == key:
            return True
        at = (at + 1) & mask
    return False


@njit(cache=True, nogil=True)
def _delete(table, counts, key) -> None:
    mask = len(table) - 1
    at = _home(table, key)
    while table[at] != EMPTY:
        if table[at] == key:
            table[at] = DELETED
            counts[0] -= 1
            return
        at = (at + 1) & mask


@njit(cache=True, nogil=True)
def _place(table, key) -> bool:
    # True if the key took an empty slot (not a deleted one); it is absent
    mask = len(table) - 1
    at = _home(table, key)
    while table[at] >= 0:
        at = (at + 1) & mask
    empty = table[at] == EMPTY
    table[at] = key
    return empty


@njit(cache=True, nogil=True)
def _insert(table, counts, key):
    """Adds an absent key; returns the table, a new one if it had to grow.
    counts: [live keys, filled slots (live and deleted)]."""
    if counts[1] + 1 > LOAD * len(table):
        size = 16
        while size * LOAD / 2 < counts[0] + 1:
            size *= 2
        grown = np.full(size, EMPTY, dtype=np.int64)
        for k in table:
            if k >= 0:
                _place(grown, k)
        table = grown
        counts[1] = counts[0]
    if _place(table, key):
        counts[1] += 1
    counts[0] += 1
    return table


@njit(cache=True, nogil=True)
def _push(lists, other, following, root, partner, at) -> None:
    # append entry `at` (partner) to root's list
    other[at] = partner
    following[at] = NONE
    if lists[root, LENGTH] == 0:
        lists[root, HEAD] = at
    else:
        following[lists[root, TAIL]] = at
    lists[root, TAIL] = at
    lists[root, LENGTH] += 1


# how many edges ahead `_look_ahead` fetches: on a local graph of 8e7 edges,
# 32 to 128 all gave 5.4 to 5.9 M edges/s against 4.0 to 4.7 without
# (docs/performance.md, "The mutex kernels faster"); on an image block, all
# the same
AHEAD = 64


@njit(cache=True, nogil=True)
def _look_ahead(parent, flat_lists, table, pairs, i, n) -> None:
    """Fetch, while edge i is taken, what later edges will read: the
    union-find entries of edge i + 2 AHEAD's nodes, and for edge i + AHEAD
    (its nodes' parents fetched by now) the list heads and the hash slot of
    its nodes' grandparents, which are mostly their roots. On a graph larger
    than the caches every one of these is a miss that the edge would
    otherwise wait for, behind branches the CPU cannot foresee."""
    far = i + 2 * AHEAD
    if far < len(pairs):
        prefetch(parent, pairs[far, 0])
        prefetch(parent, pairs[far, 1])
    near = i + AHEAD
    if near < len(pairs):
        a, b = parent[parent[pairs[near, 0]]], parent[parent[pairs[near, 1]]]
        prefetch(flat_lists, LIST_FIELDS * a)
        prefetch(flat_lists, LIST_FIELDS * b)
        prefetch(table, _home(table, _key(a, b, n)))


@njit(cache=True, nogil=True)
def repel(parent, pairs, lists, other, following, used, table, counts):
    """Mutexes between the clusters of each pair (a repulsive bucket); a
    pair already in one cluster, or already mutex, adds nothing. `other`
    and `following` must have room for 2 * len(pairs) entries from `used`
    on. Returns (the new `used`, the table)."""
    n = len(parent)
    flat_lists = lists.ravel()
    for i in range(len(pairs)):
        _look_ahead(parent, flat_lists, table, pairs, i, n)
        a = _find(parent, pairs[i, 0])
        b = _find(parent, pairs[i, 1])
        # one cluster, or kept apart already (a cluster with no mutex list is
        # mutex with nothing: no probe)
        if a == b or (lists[a, LENGTH] > 0 and lists[b, LENGTH] > 0 and _contains(table, _key(a, b, n))):
            continue
        table = _insert(table, counts, _key(a, b, n))
        _push(lists, other, following, a, pairs[i, 1], used)
        _push(lists, other, following, b, pairs[i, 0], used + 1)
        used += 2
    return used, table


@njit(cache=True, nogil=True)
def attract(parent, pairs, lists, other, following, table, counts):
    """Join the clusters of each pair (an attractive bucket) unless they are
    mutex; the joined cluster keeps both clusters' mutexes. Returns the
    table."""
    n = len(parent)
    flat_lists = lists.ravel()
    for i in range(len(pairs)):
        _look_ahead(parent, flat_lists, table, pairs, i, n)
        a = _find(parent, pairs[i, 0])
        b = _find(parent, pairs[i, 1])
        # one cluster, or kept apart already (a cluster with no mutex list is
        # mutex with nothing: no probe)
        if a == b or (lists[a, LENGTH] > 0 and lists[b, LENGTH] > 0 and _contains(table, _key(a, b, n))):
            continue
        length_a, length_b = lists[a, LENGTH], lists[b, LENGTH]
        child, root = (a, b) if length_a < length_b or (length_a == length_b and a > b) else (b, a)
        parent[child] = root
        entry = lists[child, HEAD]
        while entry != NONE:
            following_entry = following[entry]
            if following_entry != NONE:
                # the next entry, while this one is re-keyed (1.15x on 8e7 edges)
                prefetch(following, following_entry)
                prefetch(other, following_entry)
            # never root: a partner of child's is mutex with it, root is not
            partner = _find(parent, other[entry])
            _delete(table, counts, _key(child, partner, n))
            if not _contains(table, _key(root, partner, n)):
                table = _insert(table, counts, _key(root, partner, n))
                _push(lists, other, following, root, other[entry], entry)
            entry = following_entry
        lists[child, HEAD], lists[child, TAIL], lists[child, LENGTH] = NONE, NONE, 0
    return table


@njit(cache=True, nogil=True)
def resolve(parent, smallest) -> None:
    """parent[i] <- the smallest index of i's component, in place
    (`smallest`: scratch, one per node)."""
    n = len(parent)
    for i in range(n):
        parent[i] = _find(parent, i)  # roots stay roots: every node points at its own
        smallest[i] = n
    for i in range(n):
        if i < smallest[parent[i]]:
            smallest[parent[i]] = i
    for i in range(n):
        parent[i] = smallest[parent[i]]
