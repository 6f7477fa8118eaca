"""Region adjacency graphs of a block: per-offset mean affinities of the
edges, and the score at which the agglomeration first joined the two
fragments of each edge. The edges themselves come from the region merging
(`region_merging` in pipeline/kernels/watershed.py)."""

from __future__ import annotations

import numpy as np

from pipeline.kernels.compiled.rag import edge_sums, linked_sums


def nearest_channels(offsets) -> list[int]:
    """The channels of the offsets one voxel long (the nearest neighbours)."""
    return [c for c, o in enumerate(offsets) if sum(abs(x) for x in o) == 1]


def offset_pairs(shape, offset) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of voxels i and i + offset that both lie inside the block."""
    here, there = [], []
    for o, size in zip(offset, shape):
        # an offset longer than the block leaves no pair: two empty slices
        n = max(0, size - abs(o))
        here.append(slice(max(0, -o), max(0, -o) + n))
        there.append(slice(max(0, o), max(0, o) + n))
    return tuple(here), tuple(there)


def edge_means(labels: np.ndarray, affs: np.ndarray, offsets, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-offset mean affinities (E, C), float32, of the edges (u, v),
    u < v, between labels: channel c's mean is over the voxel pairs (i, i +
    offsets[c]) that link u and v, NaN where the offset never does.
    `affs[c][i]` is the affinity of i and i + offsets[c] (gunpowder's
    convention). One compiled pass over the block for all offsets
    (`edge_sums`)."""
    stride = np.int64(int(labels.max()) + 1 if labels.size else 1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 3)
    edge_keys = u.astype(np.int64) * stride + v.astype(np.int64)
    counts = np.zeros((len(offsets), len(edge_keys)), dtype=np.int64)
    sums = np.zeros((len(offsets), len(edge_keys)), dtype=np.float64)
    edge_sums(labels, affs, offsets, stride, edge_keys, counts, sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).astype(np.float32).T.copy()


def linked_edges(labels: np.ndarray, affs: np.ndarray, offsets,
                 window: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of labels u < v that some voxel pair (i, i + offsets[c])
    links, touching or not (long-range offsets link fragments apart), with
    per offset the number of such pairs and the sum of their affinities:
    (u, v, counts (E, C) int64, sums (E, C) float64), edges sorted by (u, v).
    One compiled pass for all offsets (`linked_sums`).

    With `window` (slices of `labels`), only the edges of the labels that
    lie inside it are sure to be whole (the pairs that neither end in it
    are mostly skipped): a block's own fragments' edges, without the pairs
    among the context's alone (on the bench's graph blocks, whose context
    reaches the longest offset: 0.26 to 0.38 s a block against 0.54 to
    0.81 s, the same edges for the block's fragments)."""
    stride = np.int64(int(labels.max()) + 1 if labels.size else 1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 3)
    window = window or tuple(slice(0, s) for s in labels.shape)
    box = np.array([b for w, s in zip(window, labels.shape) for b in w.indices(s)[:2]], dtype=np.int64)
    keys, counts, sums = linked_sums(labels, affs, offsets, stride, box)
    order = np.argsort(keys)
    keys = keys[order]
    return keys // stride, keys % stride, counts[:, order].T.copy(), sums[:, order].T.copy()


def first_join_scores(n: int, history: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """For each edge (u, v) of labels 1..n, the score of the merge at which u
    and v first ended up in one region (NaN if they never did). `history`
    rows are (a, b, score): regions a and b became region a.

    The merges build a binary merge tree (leaves 1..n, one inner node per
    merge, created in merge order); the wanted score is that of the lowest
    common ancestor, found for all edges at once by binary lifting."""
    m = len(history)
    a, b = (history[:, k].astype(np.int64) for k in range(2))
    c = a
    merge = np.arange(m, dtype=np.int64)
    # merge j joins the nodes that regions a_j and b_j were last turned into:
    # inner node n+1+j' for the latest j' < j with c_j' == region, else the
    # leaf itself. Found for all merges at once on keys region * (m+1) + j.
    made = np.sort(c * (m + 1) + merge)

    def node_before(region: np.ndarray) -> np.ndarray:
        at = np.searchsorted(made, region * (m + 1) + merge) - 1
        hit = (at >= 0) & (made[np.maximum(at, 0)] // (m + 1) == region)
        return np.where(hit, n + 1 + made[np.maximum(at, 0)] % (m + 1), region)

    parent = np.arange(n + 1 + m)
    parent[node_before(a)] = n + 1 + merge
    parent[node_before(b)] = n + 1 + merge
    score = np.full(n + 1 + m, np.nan)
    score[n + 1 :] = history[:, 2]
    # pointer jumping: after round k, `pointer` is each node's 2^k-th
    # ancestor (or its root) and `depth` the distance to it, so the rounds
    # yield the binary-lifting table and, at the end, every node's depth
    is_root = parent == np.arange(len(parent))
    depth = (~is_root).astype(np.int64)
    pointer = parent
    up = [parent]
    while not np.array_equal(pointer[pointer], pointer):
        depth = depth + depth[pointer]
        pointer = pointer[pointer]
        up.append(pointer)
    levels = len(up)
    x, y = u.astype(np.int64).copy(), v.astype(np.int64).copy()
    swap = depth[x] < depth[y]
    x[swap], y[swap] = y[swap], x[swap]
    diff = depth[x] - depth[y]
    for k in range(levels):
        step = (diff >> k) & 1 == 1
        x[step] = up[k][x[step]]
    for k in reversed(range(levels)):
        differ = up[k][x] != up[k][y]
        x[differ] = up[k][x[differ]]
        y[differ] = up[k][y[differ]]
    lca = np.where(x == y, x, parent[x])
    joined = (lca == parent[y]) | (x == y)
    result = np.where(joined & (lca > n), score[lca], np.nan)
    return result.astype(np.float32)
