"""Block-wise sums of the proofreading list (pipeline/proofreading.py):
the segmentation and the uncertainty of block + one voxel, the block's
pairs across two segments and its segments, into RUN_DIR/proofreading/blocks/BLOCK.npz,
which the master adds up."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.proofreading import block_statistics
from pipeline.storage.files import write_atomically
from pipeline.orchestration.run_layout import prediction_path
from pipeline.storage.volumes import open_volume, read_roi, read_uncertainty, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, run_dir = run.layout, run.run_dir
    segmentation = open_ds(run_dir.volumes / "segmentation")
    uncertainty_path = prediction_path(run.config, run_dir, "uncertainty")
    uncertainty = open_volume(*split_path(uncertainty_path), field="uncertainty")

    def process_block(block) -> None:
        # a pair's partner beyond the volume is no pair
        roi = block.read_roi.intersect(layout.roi)
        result = block_statistics(read_roi(segmentation, roi, "segmentation"),
                                  read_uncertainty(uncertainty, roi, uncertainty_path),
                                  layout.offsets, layout.window(block.write_roi, roi), roi.offset, layout.voxel_size)
        buffer = io.BytesIO()
        np.savez(buffer, **result)
        write_atomically(run_dir.proofreading / "blocks" / f"{layout.block_index(block.write_roi)}.npz",
                         buffer.getvalue())

    yield process_block


def main() -> None:
    run_worker(setup, "proofread")


if __name__ == "__main__":
    main()
