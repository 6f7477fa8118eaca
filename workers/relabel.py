"""Block-wise relabelling: fragments through the look-up table of the
configured threshold into the uint64 `segmentation` dataset."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from funlib.persistence import open_ds

from pipeline.kernels.lut import apply_mapping, load_lut
from pipeline.storage.volumes import read_roi
from workers.loop import ProcessBlock, WorkerRun, run_worker


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    agglomerate = run.config.agglomerate
    keys, segments = load_lut(run.run_dir.lut(agglomerate.scoring, agglomerate.threshold))
    fragments = open_ds(run.run_dir.volumes / "fragments")
    segmentation = open_ds(run.run_dir.volumes / "segmentation", mode="r+")

    def process_block(block) -> None:
        segmentation[block.write_roi] = apply_mapping(read_roi(fragments, block.write_roi, "fragments"), keys, segments)

    yield process_block


def main() -> None:
    run_worker(setup, "relabel")


if __name__ == "__main__":
    main()
