"""The `segments` step: one look-up table per threshold from the whole RAG,
streamed (pipeline/kernels/lut.py)."""

from __future__ import annotations

import numpy as np

from pipeline.config import threshold_key
from pipeline.kernels.lut import FragmentIndex, build_luts
from pipeline.orchestration.run_layout import RunDir, RunLayout
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
