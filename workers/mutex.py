"""Block-wise 2D post-processing: each section of a block (whole sections in
y and x, see RunLayout) is partitioned by mutex watershed, small segments
are merged, and the result goes straight into `segmentation`.

Ids are `block_index * voxels_per_block + local` with local ids counted over
the block's sections, unique across blocks as for fragments."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.kernels.mutex import clean_foreground, long_range_strides, merge_small_segments, mutex_watershed, block_tie_seed
from pipeline.orchestration.run_layout import prediction_path
from pipeline.storage.volumes import open_volume, read_affinities, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker, sample_block


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, options = run.layout, run.config.mutex
    affs_path = prediction_path(run.config, run.run_dir)
    affs = open_volume(*split_path(affs_path), field="affinities")
    segmentation = open_ds(run.run_dir.volumes / "segmentation", mode="r+")
    offsets = [o[1:] for o in layout.offsets]
    biases = options.channel_biases(len(offsets))
    stride = None if options.long_range_stride is None else options.long_range_stride[1:]
    strides = long_range_strides(offsets, stride)
    # a model with a foreground output: segment inside it only
    foreground_path = prediction_path(run.config, run.run_dir, "foreground")
    has_foreground = any(e[0] == "foreground" for e in layout.extras)
    foreground = open_volume(*split_path(foreground_path), field="foreground") if has_foreground else None
    # load the kernels: one section of a sample block
    merge_small_segments(mutex_watershed(sample_block(layout.offsets)[0][:, 0], offsets, biases, strides), options.merge_small)

    def process_block(block) -> None:
        data = read_affinities(affs, block.write_roi, affs_path)
        probability = read_roi(foreground, block.write_roi, foreground_path)[0] / 255.0 if foreground is not None else None
        out = np.zeros(data.shape[1:], dtype=np.uint64)
        bump = np.uint64(layout.first_id(layout.block_index(block.write_roi)))
        count = 0
        first = (block.write_roi.offset - layout.roi.offset)[0] // layout.voxel_size[0]
        for z in range(data.shape[1]):
            mask = None
            if probability is not None:
                mask = clean_foreground(probability[z], options.foreground_threshold, options.foreground_min_size)
            # a section's random strides and tie order depend on the seed and its index only
            rng = np.random.default_rng([options.seed, int(first + z)]) if options.randomized_strides else None
            labels = mutex_watershed(data[:, z], offsets, biases, strides, rng, mask, block_tie_seed(options.seed, int(first + z)))
            labels = merge_small_segments(labels, options.merge_small)
            out[z] = np.where(labels > 0, labels + np.uint64(count) + bump, 0)
            count += int(labels.max())
        segmentation[block.write_roi] = out

    yield process_block


def main() -> None:
    run_worker(setup, "mutex")


if __name__ == "__main__":
    main()
