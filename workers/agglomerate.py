"""Block-wise agglomeration: RAG edges with merge scores.

waterz agglomerates the fragments of block + context to the end and keeps
the merge history; every edge gets the score at which its two fragments
first joined. The block that holds the centre of `u` (the smaller id) owns
the edge. A fragment lies inside its block's write ROI, a box, so its centre
does too: the owner is simply the block encoded in `u`'s id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.graph_store import Edges, open_store
from pipeline.rag import first_join_scores, rag_edges
from pipeline.watershed import merge_history, relabel_consecutive
from workers.loop import ProcessBlock, WorkerRun, run_worker


def block_edges(affs: np.ndarray, fragments: np.ndarray, offsets, scoring: str) -> Edges:
    """All RAG edges of the block, in fragment ids, with merge scores."""
    local, ids = relabel_consecutive(fragments)
    u, v, means = rag_edges(local, affs, offsets)
    history = merge_history(affs, local, scoring)
    scores = first_join_scores(len(ids), history, u, v)
    # local labels are ranks of the sorted ids, so u < v holds for ids too
    return Edges(ids[u - 1], ids[v - 1], scores, means)


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout = run.layout
    affs = open_ds(run.run_dir.volumes / "affs")
    fragments = open_ds(run.run_dir.volumes / "fragments")
    with open_store(run.config.store, run.run_dir.path) as store:

        def process_block(block) -> None:
            data = affs.to_ndarray(block.read_roi, fill_value=0).astype(np.float32) / 255.0
            labels = fragments.to_ndarray(block.read_roi, fill_value=0)
            edges = block_edges(data, labels, layout.offsets, run.config.agglomerate.scoring)
            index = layout.block_index(block.write_roi)
            own = layout.block_of_fragment(edges.u) == index
            store.write_edges(index, Edges(edges.u[own], edges.v[own], edges.scores[own], edges.affinities[own]))

        yield process_block


def main() -> None:
    run_worker(setup, "agglomerate")


if __name__ == "__main__":
    main()
