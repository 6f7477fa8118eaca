"""Block-wise relabelling of a mutex_3d run: the fragments of block +
context through the run's table, the segments below `mutex.min_size` voxels
removed and the others grown back over them by a seeded watershed on the
affinities (the methods notes' post-processing), the block's part into
`segmentation`. The context lets a segment grow in from a neighbouring
block; a removed segment that no other reaches within it keeps its label,
so no voxel inside the volume is left unlabelled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.kernels.lut import LookUpTable
from pipeline.kernels.watershed import grow_over
from pipeline.orchestration.run_layout import prediction_path
from pipeline.orchestration.segments import small_segments
from pipeline.storage.volumes import open_volume, read_affinities, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker, sample_block


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, run_dir = run.layout, run.run_dir
    # the master's choice (Partitioner.before_resume), which the done markers belong to
    key = json.loads(run_dir.relabel_target.read_text())["table"]
    table = LookUpTable.open(run_dir.lut(key))
    small = np.load(small_segments(run_dir, key))
    fragments = open_ds(run_dir.volumes / "fragments")
    segmentation = open_ds(run_dir.volumes / "segmentation", mode="r+")
    affs_path = prediction_path(run.config, run_dir)
    affs = open_volume(*split_path(affs_path), field="affinities")
    # the watershed reads the 3 nearest-neighbour channels only
    affs.lazy_op(np.s_[0:3])

    sample, labels = sample_block(layout.offsets)
    # load the kernels (sample_block)
    table.map(np.zeros((1, 1, 1), np.uint64))
    grow_over(labels, labels == 1, sample)

    def process_block(block) -> None:
        # block + context where there are fragments
        roi = block.read_roi.intersect(layout.roi)
        segments = table.map(read_roi(fragments, roi, "fragments"))
        holes = np.isin(segments, small)
        if holes.any():
            segments = grow_over(segments, holes, read_affinities(affs, roi, affs_path, fill_value=0))
        segmentation[block.write_roi] = segments[layout.window(block.write_roi, roi)]

    yield process_block


def main() -> None:
    run_worker(setup, "mutex_relabel")


if __name__ == "__main__":
    main()
