"""Block-wise region graph of the 3D mutex watershed (partition
"mutex_3d"): every pair of fragments that some offset links, touching or
not (a long-range offset links fragments apart), with per offset the number
of voxel pairs and their mean affinity: the attractive and the repulsive
evidence the master's graph mutex watershed weighs
(Mutex3D.edge_strengths). Each edge is owned by the block of `u`, as the
waterz graph's; the context reaches every offset, so an edge's evidence is
the same whichever block sees it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
from funlib.geometry import Coordinate, Roi

from pipeline.kernels.rag import linked_edges, nearest_channels
from pipeline.storage.graph_records import Edges
from pipeline.storage.volumes import read_uncertainty
from workers.agglomerate import edges_setup
from workers.loop import ProcessBlock, WorkerRun, run_worker


def block_graph(affs: np.ndarray, labels: np.ndarray, ids: np.ndarray, offsets, window: tuple[slice, ...],
                uncertainty: np.ndarray | None = None) -> Edges:
    """The linked edges of consecutive `labels` 1..n (fragment ids `ids`,
    sorted), `affs` uint8; whole for the fragments inside `window` (the
    block's), which own their edges. With a model's `uncertainty` (one
    channel per offset), each edge's mean uncertainty over the
    nearest-neighbour voxel pairs that link it (NaN: none do)."""
    u, v, counts, sums = linked_edges(labels, affs, offsets, window)
    linked = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(linked, np.rint(sums / np.maximum(counts, 1)), 0).astype(np.uint8)
    attributes = {"linked": linked, "affinities": means, "pairs": counts.astype(np.uint32)}
    if uncertainty is not None:
        nearest = nearest_channels(offsets)
        near_u, near_v, near_counts, near_sums = linked_edges(
            labels, np.ascontiguousarray(uncertainty[nearest], dtype=np.float32), [offsets[c] for c in nearest], window)
        # the nearest neighbours' edges are among all offsets' edges, both sorted by (u, v)
        stride = np.uint64(int(labels.max()) + 1)
        keys = u.astype(np.uint64) * stride + v.astype(np.uint64)
        at = np.searchsorted(keys, near_u.astype(np.uint64) * stride + near_v.astype(np.uint64))
        attributes["uncertainty"] = np.full(len(u), np.nan, dtype=np.float32)
        attributes["uncertainty"][at] = near_sums.sum(axis=1) / near_counts.sum(axis=1)
    return Edges(ids[u - 1], ids[v - 1], attributes)


def pair_anchors(offsets, voxel_size) -> Callable[[Roi, Roi], Roi]:
    """(write ROI, read ROI) -> the voxels whose affinities the block's
    pairs read: a pair's affinity is stored at its first voxel i (the
    pair is i, i + offset), and the block counts the pairs with an end in
    it, so i lies in the block or the block minus an offset. With the
    usual negative offsets that is the block and the far side of the
    context only: on an inner block of the bench, 2.5 M voxels' affinities
    read instead of 4.3 M (the sample's 8 blocks: 0.49 against 0.63 s of
    reading)."""
    offsets = np.asarray(offsets).reshape(-1, 3)
    low = Coordinate(int(max(0, offsets[:, axis].max())) for axis in range(3)) * voxel_size
    high = Coordinate(int(max(0, -offsets[:, axis].min())) for axis in range(3)) * voxel_size
    return lambda write, read: write.grow(low, high).intersect(read)


def setup(run: WorkerRun) -> AbstractContextManager[ProcessBlock]:
    layout = run.layout
    # a model with an uncertainty: each edge's, from the uncertainty volume
    volumes = (("uncertainty", read_uncertainty),) if layout.uncertain else ()
    return edges_setup(run, lambda affs, labels, ids, window, *uncertainty:
                       block_graph(affs, labels, ids, layout.offsets, window, *uncertainty),
                       pair_anchors(layout.offsets, layout.voxel_size), volumes)


def main() -> None:
    run_worker(setup, "mutex_graph")


if __name__ == "__main__":
    main()
