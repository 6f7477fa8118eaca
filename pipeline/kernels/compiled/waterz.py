"""waterz's watershed and hierarchical region merging, compiled with numba,
on uint8 affinities: the same fragments and the same merge history as
waterz 0.10.1 fed `affs / 255` as float32, decision for decision (tested
against waterz itself, tests/test_waterz_kernels.py).

Why not waterz itself: it was most of the post-processing time (0.67 of
0.88 CPU s per block for fragments). Its region graph keeps a 256-bin
histogram of ints per edge (1 KiB each: hundreds of MB for the basins of
one block), built through a std::map per node, and adds two histograms up
whenever two edges become one. Here the graph is built from flat arrays, an
edge's histogram is its sorted affinities until it absorbs another edge,
and absorbed edges are only added up when the edge is scored again, which
for a small epsilon most never are.

The port follows waterz's order of events exactly, because the order
decides ties: edges are numbered by (u, v); the queue is 256 FIFO bins of
the discretized score; a merged or moved edge keeps its number; an edge
whose statistics grew is re-scored when it reaches the top ("stale"); the
new region keeps the smaller id.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.kernels.compiled.rag import hash_slot

# the queue's and the histograms' levels (waterz's discretize_queue=256 and
# Bins=256)
LEVELS = 256
# quantile argument that selects the running mean (MeanAffinity)
MEAN = -1

_DIR_MASK = np.array([0x01, 0x02, 0x04, 0x08, 0x10, 0x20], dtype=np.uint8)
_INVERSE_MASK = np.array([0x08, 0x10, 0x20, 0x01, 0x02, 0x04], dtype=np.uint8)
_VISITED = np.uint8(0x40)


@njit(cache=True, nogil=True)
def watershed(affs, labels) -> int:
    """waterz's (zwatershed's) steepest-ascent watershed on the 3
    nearest-neighbour channels of uint8 `affs` (3+, Z, Y, X). Writes basins
    1..n in scan order to `labels` (int64, Z Y X; 0 where every affinity is
    0) and returns n. `affs[d][p]` links p and p - e_d, gunpowder's
    convention.

    waterz's thresholds, low 0.0001 and high 0.9999 (its defaults), become
    simple for bytes: a voxel flows nowhere unless an affinity is > 0, and
    the only byte at or above high, 255, is then the largest, so "flow to
    every largest neighbour or any at or above high" is "to every largest"."""
    zdim, ydim, xdim = labels.shape
    size = zdim * ydim * xdim
    flags = np.zeros(size, np.uint8)
    for z in range(zdim):
        for y in range(ydim):
            for x in range(xdim):
                # the six neighbours' affinities, -1 outside the block (waterz
                # uses `low` there, which can never be the largest)
                nz = np.int64(affs[0, z, y, x]) if z > 0 else -1
                ny = np.int64(affs[1, z, y, x]) if y > 0 else -1
                nx = np.int64(affs[2, z, y, x]) if x > 0 else -1
                pz = np.int64(affs[0, z + 1, y, x]) if z < zdim - 1 else -1
                py = np.int64(affs[1, z, y + 1, x]) if y < ydim - 1 else -1
                px = np.int64(affs[2, z, y, x + 1]) if x < xdim - 1 else -1
                # (nested two-argument maxima: numba made one six-argument
                # max 8x slower)
                m = max(max(max(nz, ny), max(nx, pz)), max(py, px))
                if m > 0:
                    # the direction bits -z -y -x +z +y +x of the largest
                    flags[(z * ydim + y) * xdim + x] = (
                        (nz == m) | (ny == m) << 1 | (nx == m) << 2 | (pz == m) << 3 | (py == m) << 4 | (px == m) << 5
                    )
    step = np.array([-ydim * xdim, -xdim, -1, ydim * xdim, xdim, 1], np.int64)

    # plateau corners: a voxel pointing at one that does not point back
    bfs = np.empty(size, np.int64)
    end = 0
    for idx in range(size):
        for d in range(6):
            if flags[idx] & _DIR_MASK[d] and not flags[idx + step[d]] & _INVERSE_MASK[d]:
                flags[idx] |= _VISITED
                bfs[end] = idx
                end += 1
                break
    # divide the plateaus: breadth first from the corners, each voxel keeps
    # one direction out of its plateau
    at = 0
    while at < end:
        idx = bfs[at]
        keep = np.uint8(0)
        for d in range(6):
            if flags[idx] & _DIR_MASK[d]:
                him = idx + step[d]
                if flags[him] & _INVERSE_MASK[d]:
                    if not flags[him] & _VISITED:
                        bfs[end] = him
                        end += 1
                        flags[him] |= _VISITED
                else:
                    keep = _DIR_MASK[d]
        flags[idx] = keep
        at += 1

    # follow the directions to a labelled voxel, or label a new basin
    out = labels.reshape(size)
    out[:] = -1
    basins = 0
    for idx in range(size):
        if flags[idx] == 0:
            out[idx] = 0
        if out[idx] < 0 and flags[idx]:
            bfs[0] = idx
            end = 1
            at = 0
            flags[idx] |= _VISITED
            while at < end:
                me = bfs[at]
                for d in range(6):
                    if flags[me] & _DIR_MASK[d]:
                        him = me + step[d]
                        if out[him] >= 0:
                            for k in range(end):
                                out[bfs[k]] = out[him]
                            end = 0
                            break
                        elif not flags[him] & _VISITED:
                            flags[him] |= _VISITED
                            bfs[end] = him
                            end += 1
                at += 1
            if end:
                basins += 1
                for k in range(end):
                    out[bfs[k]] = basins
    return basins


@njit(cache=True, nogil=True)
def region_graph(labels, affs, n):
    """waterz's region graph of `labels` (0..n, 0 = background, ignored):
    an edge per pair of face-adjacent labels, numbered in (u, v) order, with
    the affinities (uint8, `affs[:3]`) of the voxel pairs that link them in
    waterz's order: the voxel scan (z, then y, then x), and offsets z, y, x.

    Returns (uv: (E, 2) int32 with u < v, first: (E + 1) offsets into
    `values`: the affinities of edge e are values[first[e]:first[e + 1]])."""
    # pairs grouped by their smaller label, in scan order
    start = np.zeros(n + 2, np.int64)
    _label_pairs(labels, affs, start[1:], np.empty(0, np.int32), np.empty(0, np.uint8))
    for i in range(1, n + 2):
        start[i] += start[i - 1]
    pairs = start[n + 1]
    other = np.empty(pairs, np.int32)
    byte = np.empty(pairs, np.uint8)
    _label_pairs(labels, affs, start[:-1].copy(), other, byte)
    # each label's neighbours, found with a per-label stamp, sorted; then
    # the pairs are scattered to their edge in scan order
    stamp = np.zeros(n + 1, np.int64)
    count = np.zeros(n + 1, np.int64)
    edges = 0
    for a in range(1, n + 1):
        for i in range(start[a], start[a + 1]):
            if stamp[other[i]] != a:
                stamp[other[i]] = a
                edges += 1
    uv = np.empty((edges, 2), np.int32)
    first = np.empty(edges + 1, np.int64)
    values = np.empty(pairs, np.uint8)
    neighbours = np.empty(n + 1, np.int64)
    edge = 0
    first[0] = 0
    stamp[:] = 0
    for a in range(1, n + 1):
        k = 0
        for i in range(start[a], start[a + 1]):
            b = other[i]
            if stamp[b] != a:
                stamp[b] = a
                count[b] = 0
                neighbours[k] = b
                k += 1
            count[b] += 1
        if k <= 32:
            _insertion_sort(neighbours, k)
        else:
            # a large region can border thousands of small ones
            neighbours[:k].sort()
        for j in range(k):
            b = neighbours[j]
            uv[edge + j, 0] = a
            uv[edge + j, 1] = b
            first[edge + j + 1] = first[edge + j] + count[b]
            # from here on, count[b] is where b's next affinity goes
            count[b] = first[edge + j]
        for i in range(start[a], start[a + 1]):
            values[count[other[i]]] = byte[i]
            count[other[i]] += 1
        edge += k
    return uv, first, values


@njit(cache=True, nogil=True)
def _label_pairs(labels, affs, slots, other, byte) -> None:
    """The face-adjacent voxel pairs of labels a != b, both > 0, in waterz's
    order (the voxel scan, then offsets z, y, x). With `other` empty, counts
    them: slots[min(a, b)] += 1. Otherwise writes max(a, b) and the pair's
    affinity at position slots[min(a, b)], and advances it."""
    zdim, ydim, xdim = labels.shape
    write = len(other) > 0
    for z in range(zdim):
        for y in range(ydim):
            for x in range(xdim):
                a = labels[z, y, x]
                if a == 0:
                    continue
                for d in range(3):
                    if (d == 0 and z == 0) or (d == 1 and y == 0) or (d == 2 and x == 0):
                        continue
                    b = labels[z - (d == 0), y - (d == 1), x - (d == 2)]
                    if a != b and b > 0:
                        lo = min(a, b)
                        if write:
                            other[slots[lo]] = max(a, b)
                            byte[slots[lo]] = affs[d, z, y, x]
                        slots[lo] += 1


@njit(cache=True, nogil=True)
def _insertion_sort(values, k) -> None:
    # values[:k] ascending, for the short runs where this beats a library sort
    for i in range(1, k):
        x = values[i]
        j = i - 1
        while j >= 0 and values[j] > x:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = x


@njit(cache=True, nogil=True)
def sort_segments(values, first) -> None:
    """Each edge's affinities ascending, in place: the sorted segment is its
    histogram, and its quantiles are read off by index."""
    counts = np.zeros(256, np.int64)
    for e in range(len(first) - 1):
        s, t = first[e], first[e + 1]
        if t - s <= 32:
            _insertion_sort(values[s:], t - s)
        else:
            for i in range(s, t):
                counts[values[i]] += 1
            i = s
            for c in range(256):
                for _ in range(counts[c]):
                    values[i] = c
                    i += 1
                counts[c] = 0


@njit(cache=True, nogil=True)
def running_means(values, first, as_float):
    """waterz's MeanAffinityProvider: each edge's mean, float32, added up
    in the order of `values` (float rounding depends on it)."""
    means = np.zeros(len(first) - 1, np.float32)
    for e in range(len(first) - 1):
        m = np.float32(0)
        for k in range(first[e + 1] - first[e]):
            m = (as_float[values[first[e] + k]] + m * np.float32(k)) / np.float32(k + 1)
        means[e] = m
    return means


@njit(cache=True, nogil=True)
def _discretize(value, levels):
    # waterz's discretize<int>(float value, int levels), NaN to 0
    if not value > 0:
        return 0
    if value >= 1:
        return levels - 1
    return min(int(value * np.float32(levels)), levels - 1)


@njit(cache=True, nogil=True)
def _statistic_score(statistic):
    # OneMinus<...> of a float statistic, in waterz's float arithmetic
    return np.float32(1.0 - np.float64(np.float32(statistic)))


@njit(cache=True, nogil=True)
def _bin_score(level):
    # HistogramQuantileProvider's value of a bin: its centre
    return _statistic_score(np.float32((level + 0.5) / LEVELS))


# the edge table: open addressing on key min * stride + max, -1 = empty;
# deletion shifts later entries back, so there are no tombstones
@njit(cache=True, nogil=True)
def _find_edge(keys, edges, key, shift, mask):
    h = hash_slot(key, shift)
    while keys[h] != -1:
        if keys[h] == key:
            return edges[h]
        h = (h + 1) & mask
    return -1


@njit(cache=True, nogil=True)
def _insert_edge(keys, edges, key, edge, shift, mask) -> None:
    h = hash_slot(key, shift)
    while keys[h] != -1:
        h = (h + 1) & mask
    keys[h] = key
    edges[h] = edge


@njit(cache=True, nogil=True)
def _remove_edge(keys, edges, key, shift, mask) -> None:
    i = hash_slot(key, shift)
    while keys[i] != key:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if keys[j] == -1:
            break
        home = hash_slot(keys[j], shift)
        # the entry at j may move back to i unless its home lies in (i, j]
        if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            keys[i] = keys[j]
            edges[i] = edges[j]
            i = j
    keys[i] = -1


@njit(cache=True, nogil=True)
def merge_regions(n, uv, first, values, bins, means, quantile, threshold):
    """waterz's IterativeRegionMerging over the graph of `region_graph`,
    until the cheapest edge scores >= `threshold` (float32). For a quantile
    score, `values` holds each edge's affinities sorted (`sort_segments`);
    for the mean, `means` holds the edges' running means.

    Returns (parent, history): region roots by parent pointers (`roots`),
    and the merges as rows (a, b, score): regions a < b became region a.

    An edge that absorbs another's affinities (a merge that makes two edges
    one) only notes it; the histograms are added up when the edge is next
    scored ("stale"). Edges that never come back to the top of the queue
    before `threshold` (most of them, for a small epsilon) never pay for it."""
    edges = len(uv)
    uv = uv.copy()
    stride = np.int64(n + 1)
    bits = 1
    while (1 << bits) < 2 * max(edges, 1):
        bits += 1
    mask = (1 << bits) - 1
    shift = np.uint64(64 - bits)
    keys = np.full(1 << bits, -1, np.int64)
    table = np.empty(1 << bits, np.int32)
    for e in range(edges):
        _insert_edge(keys, table, uv[e, 0] * stride + uv[e, 1], e, shift, mask)

    # incidence lists as linked lists of slots, 2e on u's side and 2e + 1
    # on v's; an edge that is gone stays in its lists until they are read
    head = np.full(n + 1, -1, np.int32)
    tail = np.full(n + 1, -1, np.int32)
    after = np.full(2 * edges, -1, np.int32)
    for s in range(2 * edges):
        _append(head, tail, after, uv[s >> 1, s & 1], s)

    # histograms: an edge's own sorted affinities until it absorbs another,
    # then runs (bin, count) in a pool; absorbed edges wait in a list
    total = np.empty(edges, np.int64)
    for e in range(edges):
        total[e] = first[e + 1] - first[e]
    run_start = np.full(edges, -1, np.int64)
    run_len = np.zeros(edges, np.int64)
    waiting = np.full(edges, -1, np.int32)
    next_waiting = np.full(edges, -1, np.int32)
    run_bin = np.empty(max(1024, edges), np.uint8)
    run_count = np.empty(max(1024, edges), np.int64)
    used = 0
    scratch = np.zeros(LEVELS, np.int64)
    stack = np.empty(max(edges, 1), np.int32)

    score = np.empty(edges, np.float32)
    stale = np.zeros(edges, np.bool_)
    gone = np.zeros(edges, np.bool_)  # merged, or absorbed into another
    # the queue: FIFO bins of the discretized score, as linked entries; an
    # edge is pushed once, and again only when popped stale (after one of
    # the at most `edges` absorptions)
    queued = np.empty(2 * edges + 1, np.int32)
    behind = np.full(2 * edges + 1, -1, np.int32)
    front = np.full(LEVELS, -1, np.int64)
    back = np.full(LEVELS, -1, np.int64)
    pushed = 0
    lowest = LEVELS
    for e in range(edges):
        if quantile == MEAN:
            score[e] = _statistic_score(means[e])
        else:
            score[e] = _bin_score(bins[values[first[e] + quantile * total[e] // 100]])
        pushed, lowest = _push(e, score[e], queued, behind, front, back, pushed, lowest)

    parent = np.arange(n + 1, dtype=np.int64)
    history = np.empty((max(n, 1), 3), np.float64)
    merges = 0
    while lowest < LEVELS:
        e = queued[front[lowest]]
        if score[e] >= threshold:
            break
        front[lowest] = behind[front[lowest]]
        if front[lowest] < 0:
            back[lowest] = -1
            while lowest < LEVELS and front[lowest] < 0:
                lowest += 1
        if gone[e]:
            continue
        if stale[e]:
            stale[e] = False
            if quantile == MEAN:
                score[e] = _statistic_score(means[e])
            else:
                if used + LEVELS > len(run_bin):
                    run_bin, run_count, used = _compact(run_bin, run_count, run_start, run_len)
                used = _gather(e, waiting, next_waiting, stack, first, values, bins, run_start, run_len,
                               run_bin, run_count, used, scratch)
                score[e] = _bin_score(_quantile(run_bin, run_count, run_start[e], run_len[e], quantile, total[e]))
            pushed, lowest = _push(e, score[e], queued, behind, front, back, pushed, lowest)
            continue

        a, b = uv[e, 0], uv[e, 1]
        parent[b] = a
        history[merges, 0] = a
        history[merges, 1] = b
        history[merges, 2] = score[e]
        merges += 1
        gone[e] = True
        run_start[e] = -1
        _remove_edge(keys, table, a * stride + b, shift, mask)
        # every edge of b moves to a, or joins a's edge to the same neighbour
        s = head[b]
        while s >= 0:
            following = after[s]
            f = s >> 1
            if not gone[f]:
                neighbour = uv[f, 1] if uv[f, 0] == b else uv[f, 0]
                at = min(a, neighbour) * stride + max(a, neighbour)
                other = _find_edge(keys, table, at, shift, mask)
                _remove_edge(keys, table, min(b, neighbour) * stride + max(b, neighbour), shift, mask)
                keep = f
                if other >= 0:
                    # the cheaper edge takes the other's affinities (a's edge
                    # when they score equal)
                    keep, lose = (other, f) if score[f] > score[other] else (f, other)
                    total[keep] += total[lose]
                    if quantile == MEAN:
                        means[keep] = _mean_of_both(means[lose], total[lose], means[keep], total[keep] - total[lose])
                    else:
                        next_waiting[lose] = waiting[keep]
                        waiting[keep] = lose
                    gone[lose] = True
                    stale[keep] = True
                    if keep == other:
                        keep = -1
                    else:
                        _remove_edge(keys, table, at, shift, mask)
                if keep >= 0:
                    uv[keep, 0], uv[keep, 1] = min(a, neighbour), max(a, neighbour)
                    _insert_edge(keys, table, at, keep, shift, mask)
                    # the slot on b's side now stands for a
                    after[s] = -1
                    _append(head, tail, after, a, s)
            s = following
        head[b] = -1
        tail[b] = -1
    return parent, history[:merges].copy()


@njit(cache=True, nogil=True)
def _push(e, score, queued, behind, front, back, pushed, lowest):
    # e to the back of its score's bin
    level = _discretize(score, LEVELS)
    queued[pushed] = e
    behind[pushed] = -1
    _append(front, back, behind, level, pushed)
    return pushed + 1, min(lowest, level)


@njit(cache=True, nogil=True)
def _append(first, last, following, at, item) -> None:
    # `item` to the end of linked list `at` (first and last item per list,
    # the following item per item; -1 for none)
    if first[at] < 0:
        first[at] = item
    else:
        following[last[at]] = item
    last[at] = item


@njit(cache=True, nogil=True)
def _mean_of_both(mean_from, n_from, mean_to, n_to):
    # MeanAffinityProvider::notifyEdgeMerge, in float
    return (np.float32(mean_from) * np.float32(n_from) + np.float32(mean_to) * np.float32(n_to)) / np.float32(n_from + n_to)


@njit(cache=True, nogil=True)
def _quantile(run_bin, run_count, start, length, quantile, total):
    # the first bin whose running count reaches the 1-based pivot
    pivot = quantile * total // 100 + 1
    seen = 0
    for r in range(start, start + length):
        seen += run_count[r]
        if seen >= pivot:
            return run_bin[r]
    return LEVELS


@njit(cache=True, nogil=True)
def _gather(e, waiting, next_waiting, stack, first, values, bins, run_start, run_len, run_bin, run_count, used, counts):
    """Edge e's histogram with every edge it absorbed (and they absorbed)
    added, as runs at `used` (room for 256 runs is there). Returns the new
    end of the pool."""
    top = 0
    stack[top] = e
    top += 1
    while top:
        top -= 1
        x = stack[top]
        if run_start[x] >= 0:
            for r in range(run_start[x], run_start[x] + run_len[x]):
                counts[run_bin[r]] += run_count[r]
        else:
            for i in range(first[x], first[x + 1]):
                counts[bins[values[i]]] += 1
        run_start[x] = -1
        w = waiting[x]
        while w >= 0:
            stack[top] = w
            top += 1
            w = next_waiting[w]
        waiting[x] = -1
    run_start[e] = used
    for level in range(LEVELS):
        if counts[level]:
            run_bin[used] = level
            run_count[used] = counts[level]
            counts[level] = 0
            used += 1
    run_len[e] = used - run_start[e]
    return used


@njit(cache=True, nogil=True)
def _compact(run_bin, run_count, run_start, run_len):
    """A new pool with the runs still in use, and as much room again (at
    least 256 runs)."""
    live = 0
    for e in range(len(run_start)):
        if run_start[e] >= 0:
            live += run_len[e]
    size = 2 * live + 2 * LEVELS
    bins = np.empty(size, run_bin.dtype)
    counts = np.empty(size, run_count.dtype)
    used = 0
    for e in range(len(run_start)):
        if run_start[e] >= 0:
            s = run_start[e]
            for r in range(run_len[e]):
                bins[used + r] = run_bin[s + r]
                counts[used + r] = run_count[s + r]
            run_start[e] = used
            used += run_len[e]
    return bins, counts, used


@njit(cache=True, nogil=True)
def roots(parent, labels) -> None:
    """Each label's region (the root of its parent pointers), in place."""
    for i in range(1, len(parent)):
        # parents have smaller ids, so theirs are final when i is reached
        parent[i] = parent[parent[i]]
    flat = labels.reshape(labels.size)
    for i in range(flat.size):
        flat[i] = parent[flat[i]]
