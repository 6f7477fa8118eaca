"""Block-wise relabelling: fragments through the chosen look-up table (the
configured threshold's, for waterz) into the uint64 `segmentation` dataset. The table is
memory-mapped: a worker reads only its blocks' entries, so its memory does
not grow with the number of fragments."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.kernels.lut import LookUpTable
from pipeline.storage.volumes import read_roi
from workers.loop import ProcessBlock, WorkerRun, run_worker


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    # the master's choice (Partitioner.before_resume), which the done markers belong to
    table = LookUpTable.open(run.run_dir.lut(json.loads(run.run_dir.relabel_target.read_text())["table"]))
    fragments = open_ds(run.run_dir.volumes / "fragments")
    segmentation = open_ds(run.run_dir.volumes / "segmentation", mode="r+")
    table.map(np.zeros((1, 1, 1), np.uint64))  # loads the kernel (workers/loop.py sample_block)

    def process_block(block) -> None:
        segmentation[block.write_roi] = table.map(read_roi(fragments, block.write_roi, "fragments"))

    yield process_block


def main() -> None:
    run_worker(setup, "relabel")


if __name__ == "__main__":
    main()
