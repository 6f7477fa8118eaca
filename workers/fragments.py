"""Block-wise watershed: affinities (block + context) in, fragments of the
block out, one RAG node per fragment.

Fragment ids are `block_index * voxels_per_block + local_id` (local ids from
1), unique across blocks without any coordination between workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.geometry import Roi
from funlib.persistence import Array, open_ds

from pipeline.config import FragmentsConfig
from pipeline.orchestration.run_layout import RunLayout, prediction_path, run_store
from pipeline.storage.graph_records import Nodes
from pipeline.storage.graph_store import GraphStore
from pipeline.kernels.watershed import (
    distance_watershed,
    epsilon_agglomerate,
    node_statistics,
    relabel_consecutive,
)
from pipeline.storage.volumes import open_volume, read_affinities, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker, sample_block


def block_fragments(affs: np.ndarray, options: FragmentsConfig, scoring: str, voxel_size) -> np.ndarray:
    """Fragments of uint8 affinities (block + context)."""
    if options.method == "waterz":
        return epsilon_agglomerate(affs, None, options.epsilon_agglomerate, scoring)
    fragments = distance_watershed(affs, voxel_size, options.per_section)
    if options.epsilon_agglomerate > 0:
        fragments = epsilon_agglomerate(affs, fragments, options.epsilon_agglomerate, scoring)
    return fragments


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, options = run.layout, run.config.fragments
    affs_path = prediction_path(run.config, run.run_dir)
    affs = open_volume(*split_path(affs_path), field="affinities")
    # the watershed reads the 3 nearest-neighbour channels only
    affs.lazy_op(np.s_[0:3])
    fragments = open_ds(run.run_dir.volumes / "fragments", mode="r+")
    vs = layout.voxel_size
    block_fragments(sample_block(layout.offsets)[0][:3], options, run.config.agglomerate.scoring, vs)  # loads the kernels
    with run_store(run.config, run.run_dir) as store:

        def process_block(block) -> None:
            data = read_affinities(affs, block.read_roi, affs_path, fill_value=0)
            labels = block_fragments(data, options, run.config.agglomerate.scoring, vs)
            store_fragments(labels, block.read_roi, block, layout, fragments, store)

        yield process_block


def store_fragments(labels: np.ndarray, roi: Roi, block, layout: RunLayout, fragments: Array, store: GraphStore) -> None:
    """The part of `labels` (of `roi`: block + context) inside the block as
    the block's fragments, ids `first_id + 1..n`, into `fragments`, and one
    node each into the store. Every fragments step ends here."""
    local, _ = relabel_consecutive(labels[layout.window(block.write_roi, roi)])
    n = int(local.max())
    if n > layout.voxels_per_block:
        raise AssertionError("more fragments than voxels in a block")
    index = layout.block_index(block.write_roi)
    bump = np.uint64(layout.first_id(index))
    fragments[block.write_roi] = np.where(local > 0, local + bump, np.uint64(0))
    sizes, centers = node_statistics(local, n, block.write_roi.offset, layout.voxel_size)
    ids = np.arange(1, n + 1, dtype=np.uint64) + bump
    store.write_nodes(index, Nodes(ids, centers, sizes))


def main() -> None:
    run_worker(setup, "fragments")


if __name__ == "__main__":
    main()
