"""Block-wise agglomeration: RAG edges with merge scores.

The fragments of block + context are agglomerated to the end (waterz's
region merging, pipeline/kernels/watershed.py), keeping the merge history;
every edge gets the score at which its two fragments first joined. The
block that holds the centre of `u` (the smaller id) owns the edge. A
fragment lies inside its block's write ROI, a box, so its centre does too:
the owner is simply the block encoded in `u`'s id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from funlib.geometry import Roi
from funlib.persistence import Array, open_ds

from pipeline.kernels.rag import edge_means, first_join_scores
from pipeline.orchestration.run_layout import RunLayout, prediction_path, run_store
from pipeline.storage.graph_records import Edges
from pipeline.kernels.watershed import merge_history, relabel_consecutive
from pipeline.storage.volumes import open_volume, read_affinities, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker, sample_block


# reads a run volume over a ROI, checking its values: (volume, roi, name for errors)
VolumeReader = Callable[[Array, Roi, Path], np.ndarray]


def compact_fragments(fragments: np.ndarray, roi: Roi, layout: RunLayout) -> tuple[np.ndarray, np.ndarray]:
    """`relabel_consecutive` of the fragment ids of block + context (`roi`)
    without sorting its voxels.

    Each block's fragments lie in its write ROI with ids `bump + 1 .. bump +
    n`, so shifting every neighbouring block's ids onto a running base gives
    small labels in the order of the ids, which a presence table then closes
    up. Returns (labels 1..n, 0 kept, and the sorted fragment id of each)."""
    packed = np.zeros(fragments.shape, dtype=np.int64)
    bases, bumps = [], []
    base = 0
    for index, cell in layout.blocks_meeting(roi):
        window = layout.window(cell.intersect(roi), roi)
        part = fragments[window].astype(np.int64)
        bump = layout.first_id(index)
        local = np.where(part > 0, part - bump, 0)
        packed[window] = np.where(part > 0, local + base, 0)
        bases.append(base)
        bumps.append(bump)
        base += int(local.max()) if local.size else 0
    labels, packed_ids = relabel_consecutive(packed)
    which = np.searchsorted(np.array(bases), packed_ids, side="left") - 1
    return labels, (np.array(bumps, dtype=np.int64)[which] + packed_ids - np.array(bases)[which]).astype(np.uint64)


def block_edges(affs: np.ndarray, labels: np.ndarray, ids: np.ndarray, offsets, scoring: str) -> Edges:
    """All RAG edges of the block with merge scores, for consecutive
    `labels` 1..n whose fragment ids are `ids` (sorted). `affs` is uint8."""
    uv, history = merge_history(affs, labels, scoring)
    u, v = uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64)
    means = edge_means(labels, affs, offsets, u, v)
    scores = first_join_scores(len(ids), history, u, v)
    linked = ~np.isnan(means)
    # the store keeps affinities as the volume does, in uint8
    affinities = np.where(linked, np.rint(means), 0).astype(np.uint8)
    # labels are ranks of the sorted ids, so u < v holds for ids too
    return Edges(ids[u - 1], ids[v - 1], {"merge_score": scores, "linked": linked,
                                          "affinities": affinities})


@contextmanager
def edges_setup(run: WorkerRun, edges_of: Callable[..., Edges], anchors: Callable[[Roi, Roi], Roi] | None = None,
                volumes: tuple[tuple[str, VolumeReader], ...] = ()) -> Iterator[ProcessBlock]:
    """A graph step's worker: for each block, `edges_of(uint8 affinities,
    labels, ids, the block's window in them, *the run volumes of
    `volumes`)` over block + context (the fragments as `compact_fragments`
    gives them), of which the block keeps the edges it owns (those of its
    own fragments). `volumes`: (name in volumes.zarr, the reader that
    checks its values). `anchors(write ROI, read ROI)`: the part of the
    read ROI whose affinities `edges_of` reads (the rest is 0); default all
    of it."""
    layout = run.layout
    affs_path = prediction_path(run.config, run.run_dir)
    affs = open_volume(*split_path(affs_path), field="affinities")
    fragments = open_ds(run.run_dir.volumes / "fragments")
    other_paths = [prediction_path(run.config, run.run_dir, name) for name, _ in volumes]
    others = [open_volume(*split_path(path), field=name) for path, (name, _) in zip(other_paths, volumes)]
    sample, labels = sample_block(layout.offsets)
    # loads the kernels
    edges_of(sample, labels, np.arange(1, labels.max() + 1, dtype=np.uint64), (slice(None),) * 3,
             *(np.zeros((*volume.shape[: volume.channel_dims], *labels.shape), volume.dtype) for volume in others))
    with run_store(run.config, run.run_dir) as store:

        def process_block(block) -> None:
            # block + context where there are fragments (beyond them all would be 0)
            roi = block.read_roi.intersect(layout.roi)
            if anchors is None:
                data = read_affinities(affs, roi, affs_path, fill_value=0)
            else:
                part = anchors(block.write_roi, roi)
                # np.zeros maps untouched pages lazily: only the part read is written
                data = np.zeros((len(layout.offsets), *(roi.shape / layout.voxel_size)), dtype=np.uint8)
                data[(slice(None), *layout.window(part, roi))] = read_affinities(affs, part, affs_path, fill_value=0)
            labels, ids = compact_fragments(read_roi(fragments, roi, "fragments"), roi, layout)
            edges = edges_of(data, labels, ids, layout.window(block.write_roi, roi),
                             *(read(volume, roi, path) for volume, path, (_, read) in zip(others, other_paths, volumes)))
            index = layout.block_index(block.write_roi)
            store.write_edges(index, edges.select(layout.block_of_fragment(edges.u) == index))

        yield process_block


def setup(run: WorkerRun) -> AbstractContextManager[ProcessBlock]:
    scoring = run.config.agglomerate.scoring
    # the merge scores come from agglomerating block + context whole: no window
    return edges_setup(run, lambda affs, labels, ids, window: block_edges(affs, labels, ids, run.layout.offsets, scoring))


def main() -> None:
    run_worker(setup, "agglomerate")


if __name__ == "__main__":
    main()
