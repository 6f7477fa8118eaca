"""Block-wise 3D mutex watershed (partition "mutex_3d"): the affinities of
block + context, every channel, partitioned by mutex watershed (each channel
attracts above its bias and repels below it; the methods notes' split: the
nearest neighbours attract, the long-range offsets repel); the block's part
is its fragments, ids and nodes as the waterz fragments' (workers/fragments.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.kernels.mutex import long_range_strides, mutex_watershed, block_tie_seed
from pipeline.orchestration.run_layout import prediction_path, run_store
from pipeline.storage.volumes import open_volume, read_affinities, split_path
from workers.fragments import store_fragments
from workers.loop import ProcessBlock, WorkerRun, run_worker, sample_block


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, options = run.layout, run.config.mutex
    affs_path = prediction_path(run.config, run.run_dir)
    affs = open_volume(*split_path(affs_path), field="affinities")
    fragments = open_ds(run.run_dir.volumes / "fragments", mode="r+")
    biases = options.channel_biases(len(layout.offsets))
    strides = long_range_strides(layout.offsets, options.long_range_stride)
    mutex_watershed(sample_block(layout.offsets)[0], layout.offsets, biases, strides)  # loads the kernels
    with run_store(run.config, run.run_dir) as store:

        def process_block(block) -> None:
            # block + context where there are affinities: beyond them there
            # are no voxels (read as 0, such voxels' long-range pairs would
            # be the strongest repulsions, and a fifth of a corner block's
            # time on the bench)
            roi = block.read_roi.intersect(affs.roi)
            data = read_affinities(affs, roi, affs_path)
            index = layout.block_index(block.write_roi)
            # a block's random strides and tie order depend on the seed and its index only
            rng = np.random.default_rng([options.seed, index]) if options.randomized_strides else None
            labels = mutex_watershed(data, layout.offsets, biases, strides, rng, tie_seed=block_tie_seed(options.seed, index))
            store_fragments(labels, roi, block, layout, fragments, store)

        yield process_block


def main() -> None:
    run_worker(setup, "mutex_fragments")


if __name__ == "__main__":
    main()
