"""Fragment -> segment look-up tables: thresholded union-find over the
streamed RAG edges, in numpy (no networkx: a large run has billions of edges).

Memory is dominated by three arrays per edge while the LUTs are built: two
int32/int64 node indices and a float32 score, i.e. 12 to 20 bytes per edge,
inside the design's budget of about 40.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def apply_mapping(values: np.ndarray, keys: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """Replace each value found in sorted `keys` by its `mapped` partner;
    values not in `keys` (such as 0, background) stay as they are."""
    flat = values.ravel()
    if len(keys) == 0:
        return values.copy()
    at = np.minimum(np.searchsorted(keys, flat), len(keys) - 1)
    found = keys[at] == flat
    return np.where(found, mapped[at], flat).reshape(values.shape).astype(mapped.dtype)


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def union_find(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Join the components of u[i] and v[i] (node indices) in `parent`, a
    forest of stars, and return the new forest of stars. Every root is the
    smallest index of its component: a root is only ever hooked under a
    smaller one, so the minimum of a component is never hooked."""
    parent = _compress(parent)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            return parent
        low = np.minimum(pu[differ], pv[differ])
        high = np.maximum(pu[differ], pv[differ])
        np.minimum.at(parent, high, low)
        parent = _compress(parent)


def build_luts(
    node_ids: np.ndarray,
    edge_chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Iterable[float],
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (threshold, segment id per node) for ascending thresholds.

    An edge merges at threshold t when its merge_score <= t; NaN never
    merges. Thresholds are processed in increasing order on one forest, so
    each edge is joined once. The segment id is the smallest fragment id of
    the component, hence never 0."""
    node_ids = np.asarray(node_ids, dtype=np.uint64)
    index_type = np.int32 if len(node_ids) < 2**31 else np.int64
    us, vs, scores = [], [], []
    for u, v, s in edge_chunks:
        for ids, out in ((u, us), (v, vs)):
            at = np.minimum(np.searchsorted(node_ids, ids), max(len(node_ids) - 1, 0))
            if len(ids) and (node_ids[at] != ids).any():
                raise ValueError("an edge names a fragment that is not a node")
            out.append(at.astype(index_type))
        scores.append(s.astype(np.float32))
    u = np.concatenate(us) if us else np.zeros(0, index_type)
    v = np.concatenate(vs) if vs else np.zeros(0, index_type)
    score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    # sorting by score lets each threshold take the next slice of edges
    order = np.argsort(score, kind="stable")
    u, v, score = u[order], v[order], score[order]
    parent = np.arange(len(node_ids), dtype=index_type)
    done = 0
    for threshold in sorted(thresholds):
        end = int(np.searchsorted(score, np.float32(threshold), side="right"))  # NaN sorts last
        if end > done:
            parent = union_find(parent, u[done:end], v[done:end])
            done = end
        yield threshold, node_ids[_compress(parent)]


def save_lut(path: Path, fragments: np.ndarray, segments: np.ndarray) -> None:
    """Atomically: a reader never sees a half-written table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, fragments=fragments, segments=segments)
    tmp.replace(path)


def load_lut(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["fragments"], data["segments"]
