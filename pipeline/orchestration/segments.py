"""The `segments` step: one look-up table per threshold from the whole RAG."""

from __future__ import annotations

import numpy as np

from pipeline.config import RunConfig, threshold_key
from pipeline.storage.graph_store import GraphStore
from pipeline.kernels.lut import build_luts, save_lut
from pipeline.orchestration.run_layout import RunDir


def write_luts(config: RunConfig, run_dir: RunDir, store: GraphStore) -> dict[str, int]:
    node_ids = store.node_ids()
    counts = {"fragments": len(node_ids), "edges": 0}

    def counted_edges():
        for chunk in store.stream_edges():
            counts["edges"] += len(chunk[0])
            yield chunk

    for threshold, segments in build_luts(node_ids, counted_edges(), config.agglomerate.thresholds):
        save_lut(run_dir.lut(config.agglomerate.scoring, threshold), node_ids, segments)
        counts[f"segments@{threshold_key(threshold)}"] = int(len(np.unique(segments)))
    return counts
