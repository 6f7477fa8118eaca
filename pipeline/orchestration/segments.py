"""The `segments` step, the master's look-up tables from the whole region
graph, streamed: one per threshold for waterz (pipeline/kernels/lut.py),
one by the graph mutex watershed for mutex_3d
(pipeline/kernels/graph_mutex.py)."""

from __future__ import annotations

import numpy as np

from pipeline.config import threshold_key
from pipeline.kernels.compiled.graph_mutex import class_strengths
from pipeline.kernels.graph_mutex import LEVELS, mutex_lut
from pipeline.kernels.lut import FragmentIndex, build_luts
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.storage.graph_records import Edges
from pipeline.storage.graph_store import GraphStore


def write_luts(layout: RunLayout, run_dir: RunDir, store: GraphStore, tables: dict[float, str]) -> dict[str, int]:
    """The look-up table of each threshold, saved under its key in `tables`
    (threshold -> key, Waterz.table); the graph's counts for the report."""
    ids = store.node_ids()
    fragments = FragmentIndex.from_ids(ids, layout.voxels_per_block, int(np.prod(layout.block_grid)))
    counts = {"fragments": len(fragments), "edges": 0}

    def counted_edges():
        for chunk in store.stream_edges(["merge_score"]):
            counts["edges"] += len(chunk)
            yield chunk.u, chunk.v, chunk["merge_score"]

    for threshold, table in build_luts(fragments, counted_edges(), list(tables)):
        table.save(run_dir.lut(tables[threshold]))
        # a segment is named by its smallest fragment, which maps to itself;
        # the store's ids are the index's ids, in its order (from_ids checks)
        counts[f"segments@{threshold_key(threshold)}"] = int(np.count_nonzero(table.segments == ids))
    return counts


def edge_strengths(edges: Edges, nearest: np.ndarray, biases: np.ndarray):
    """Each edge's attractive and repulsive evidence as signed strengths
    (pipeline/kernels/graph_mutex.py): per class of offsets (the nearest
    neighbours, `nearest`, and the long-range ones), the pair-weighted mean
    of (affinity - bias) over the offsets of that class that link u and v,
    on the uint8 scale. Yields (u, v, strength) for each class, for the
    edges that class links: two edges between one pair, as volara's
    adjacent and long-range edges."""
    pairs, affinities = np.ascontiguousarray(edges["pairs"]), np.ascontiguousarray(edges["affinities"])
    shift = np.asarray(biases, dtype=np.float64) * LEVELS
    strength, has = np.empty(len(pairs), dtype=np.int16), np.empty(len(pairs), dtype=bool)
    for members in (nearest, ~nearest):
        class_strengths(pairs, affinities, shift, members, LEVELS, strength, has)
        yield edges.u[has], edges.v[has], strength[has]


def write_mutex_lut(layout: RunLayout, run_dir: RunDir, store: GraphStore, key: str, biases, min_size: int) -> dict[str, int]:
    """The one look-up table of a mutex_3d run, saved under `key`, and the
    ids of its segments smaller than `min_size` voxels (`small_segments`:
    relabel grows the others over them); the graph's counts for the report."""
    ids, sizes = store.node_sizes()
    fragments = FragmentIndex.from_ids(ids, layout.voxels_per_block, int(np.prod(layout.block_grid)))
    nearest = np.array([sum(abs(o) for o in offset) == 1 for offset in layout.offsets])
    counts = {"fragments": len(fragments), "edges": 0}

    def strengths():
        for chunk in store.stream_edges(["linked", "affinities", "pairs"]):
            counts["edges"] += len(chunk)
            yield from edge_strengths(chunk, nearest, biases)

    table = mutex_lut(fragments, strengths())
    table.save(run_dir.lut(key))
    segments, at = np.unique(table.segments, return_inverse=True)
    small = segments[np.bincount(at, weights=sizes, minlength=len(segments)) < min_size]
    np.save(small_segments(run_dir, key), small)
    counts["segments"] = len(segments)
    counts["small_segments"] = len(small)
    return counts


def small_segments(run_dir: RunDir, key: str):
    """The sorted ids of a table's segments below the size (write_mutex_lut)."""
    return run_dir.lut(key).with_name(run_dir.lut(key).stem + ".small.npy")
