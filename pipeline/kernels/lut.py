"""Fragment -> segment look-up tables, streamed: the RAG's edges are read
once, bucketed by the first threshold at which each merges, and merged
bucket by bucket into one union-find over the fragments (no networkx, no
sort of all edges: a large run has billions of them).

Master memory: the fragment ids, the union-find and one table (8 + 4..8 +
8 bytes per fragment), plus 8 bytes per edge (16 with more than 2^31
fragments) for the buckets. A table is stored in fragment-id order with
each block's start, so a relabel worker memory-maps it and touches only
the entries of its own block's fragments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.kernels.compiled.lut import edge_buckets, flatten, fragment_indices, scatter_edges, union_edges


def apply_mapping(values: np.ndarray, keys: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """Replace each value found in sorted `keys` by its `mapped` partner;
    values not in `keys` (such as 0, background) stay as they are."""
    flat = values.ravel()
    if len(keys) == 0:
        return values.copy()
    at = np.minimum(np.searchsorted(keys, flat), len(keys) - 1)
    found = keys[at] == flat
    return np.where(found, mapped[at], flat).reshape(values.shape).astype(mapped.dtype)


@dataclass(frozen=True)
class FragmentIndex:
    """Dense indices 0..n-1 of a run's fragment ids, by arithmetic: block
    b's fragments are b * voxels_per_block + 1 .. + n_b (workers/fragments.py),
    at indices starts[b] .. starts[b + 1] - 1. Index order is id order."""

    voxels_per_block: int
    starts: np.ndarray  # int64, one per block and one more

    @classmethod
    def from_ids(cls, ids: np.ndarray, voxels_per_block: int, blocks: int) -> FragmentIndex:
        """From all fragment ids, sorted; refuses ids that are not 1..n_b per block."""
        ids = np.asarray(ids, dtype=np.uint64)
        block = ((ids - np.uint64(1)) // np.uint64(voxels_per_block)).astype(np.int64) if len(ids) else ids.astype(np.int64)
        if len(ids) and (ids.min() == 0 or block.max() >= blocks):
            raise ValueError("a fragment id lies outside the run's blocks")
        starts = np.zeros(blocks + 1, dtype=np.int64)
        np.cumsum(np.bincount(block, minlength=blocks), out=starts[1:])
        index = cls(voxels_per_block, starts)
        if not np.array_equal(index.ids(), ids):
            raise ValueError("the fragment ids are not 1..n in each block")
        return index

    def __len__(self) -> int:
        return int(self.starts[-1])

    def ids(self) -> np.ndarray:
        """Every fragment id, in index order."""
        counts = np.diff(self.starts)
        block = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
        local = np.arange(len(self), dtype=np.int64) - np.repeat(self.starts[:-1], counts)
        return block * np.uint64(self.voxels_per_block) + local.astype(np.uint64) + np.uint64(1)

    def index(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.int64)
        if not fragment_indices(np.ascontiguousarray(ids, dtype=np.uint64), self.voxels_per_block, self.starts, out):
            raise ValueError("an edge or a voxel names a fragment that is not a node")
        return out


@dataclass(frozen=True)
class LookUpTable:
    """The segment id of every fragment of a run, in `FragmentIndex` order.

    Stored as one uint64 .npy: [number of blocks B, voxels per block,
    B + 1 block starts, segments], which `open` memory-maps."""

    fragments: FragmentIndex
    segments: np.ndarray  # uint64, one per fragment

    def map(self, fragments: np.ndarray) -> np.ndarray:
        """Segment ids of a fragment volume; 0 (background) stays 0."""
        return next(map_each([self], fragments))

    def save(self, path: Path) -> None:
        """Atomically: a reader never sees a half-written table."""
        index = self.fragments
        header = np.array([len(index.starts) - 1, index.voxels_per_block], dtype=np.uint64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint64, shape=(2 + len(index.starts) + len(index),))
        table[:2] = header
        table[2 : 2 + len(index.starts)] = index.starts
        table[2 + len(index.starts) :] = self.segments
        table.flush()
        del table
        tmp.replace(path)

    @classmethod
    def open(cls, path: Path) -> LookUpTable:
        table = np.load(path, mmap_mode="r")
        blocks, voxels_per_block = int(table[0]), int(table[1])
        starts = np.array(table[2 : 3 + blocks], dtype=np.int64)
        return cls(FragmentIndex(voxels_per_block, starts), table[3 + blocks :])


def map_each(tables: list[LookUpTable], fragments: np.ndarray) -> Iterator[np.ndarray]:
    """`table.map(fragments)` for each of a run's tables (one per threshold,
    all over the same fragments), with the fragments' indices found once."""
    flat = fragments.ravel()
    inside = flat != 0
    at = tables[0].fragments.index(flat[inside]) if tables else None
    for table in tables:
        out = np.zeros(flat.shape, dtype=np.uint64)
        out[inside] = table.segments[at]
        yield out.reshape(fragments.shape)


def build_luts(
    fragments: FragmentIndex,
    edge_chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Iterable[float],
) -> Iterator[tuple[float, LookUpTable]]:
    """Yield (threshold, table) for ascending thresholds.

    An edge merges at threshold t when its merge_score <= t; NaN never
    merges. Each edge goes into the bucket of the first threshold it merges
    at; bucket k is joined into the forest before table k is taken, so each
    edge is joined once. The segment id is the smallest fragment id of the
    component, hence never 0."""
    thresholds = sorted(thresholds)
    if len(thresholds) > 255:
        raise ValueError("at most 255 thresholds")
    limits = np.array(thresholds, dtype=np.float32)
    index_type = np.int32 if len(fragments) < 2**31 else np.int64
    buckets: list[list[np.ndarray]] = [[] for _ in thresholds]
    counts = np.zeros(len(thresholds) + 1, dtype=np.int64)
    for u, v, scores in edge_chunks:
        bucket = np.empty(len(scores), dtype=np.uint8)
        edge_buckets(np.ascontiguousarray(scores, dtype=np.float32), limits, bucket, counts)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        # only edges that merge at some threshold are kept
        pairs = np.empty((bounds[-2], 2), dtype=index_type)
        u, v = (np.ascontiguousarray(ids, dtype=np.uint64) for ids in (u, v))
        if not scatter_edges(u, v, bucket, bounds, fragments.voxels_per_block, fragments.starts, pairs):
            raise ValueError("an edge names a fragment that is not a node")
        for k in range(len(thresholds)):
            if bounds[k + 1] > bounds[k]:
                buckets[k].append(pairs[bounds[k] : bounds[k + 1]])
    parent = np.arange(len(fragments), dtype=index_type)
    ids = fragments.ids()
    for k, threshold in enumerate(thresholds):
        for pairs in buckets[k]:
            union_edges(parent, pairs[:, 0], pairs[:, 1])
        buckets[k] = []  # joined: free it
        flatten(parent)
        yield threshold, LookUpTable(fragments, ids[parent])
