"""Block-wise post-processing is exact: on the same affinities, 8 blocks give
the segmentation of one block covering the whole volume.

The affinities here are those of the sample's ground truth with Gaussian
noise, so that waterz makes thousands of fragments and a real merge tree.
With the bundled network's predicted affinities the same comparison is made
end to end in test_main_job.py.
"""

from __future__ import annotations

from pathlib import Path

import daisy
import numpy as np
import pytest
from funlib.persistence import open_ds

from pipeline.config import RunConfig
from pipeline.storage.graph_store import open_store
from pipeline.kernels.lut import LookUpTable
from pipeline.evaluation.metrics import evaluate_arrays
from pipeline.orchestration.partitioners import Waterz
from pipeline.orchestration.job import open_run
from pipeline.orchestration.segments import write_luts
from pipeline.orchestration.tasks import blockwise_geometry
from tests.conftest import RAW, TEST_ROI, noisy_ground_truth_affinities
from workers import agglomerate, fragments
from workers.loop import WorkerRun

THRESHOLDS = (0.3, 0.5, 0.7)


def postprocess(run_dir: Path, labels_path: str, block_shape, epsilon: float) -> tuple[dict, np.ndarray]:
    config = RunConfig(
        run_dir=str(run_dir), raw=str(RAW), ground_truth=labels_path, roi=TEST_ROI,
        model={"checkpoint": str(Path(__file__).parent.parent / "models/fib25_mala.pt")},
        fragments={"epsilon_agglomerate": epsilon},
        agglomerate={"thresholds": list(THRESHOLDS), "threshold": 0.5},
        postprocess={"block_shape": block_shape, "context": [100, 300, 300]},
    )
    layout, directory = open_run(config)
    labels = open_ds(labels_path)[layout.roi]
    affs = open_ds(directory.volumes / "affs", mode="r+")
    affs[layout.roi] = noisy_ground_truth_affinities(labels, layout.offsets, noise=0.2)

    run = WorkerRun(config, layout, directory)
    for step in (fragments, agglomerate):
        with step.setup(run) as process_block:
            task = daisy.Task(
                step.__name__, *blockwise_geometry(layout, layout.block_shape, layout.context),
                process_function=process_block, read_write_conflict=False, fit="shrink", max_retries=0,
            )
            assert daisy.run_blockwise([task], multiprocessing=False, progress=False, summary=False)
    with open_store("sqlite", run_dir, directory.run_id()) as store:
        write_luts(layout, directory, store, {t: Waterz.table("hist_quant_50", t) for t in THRESHOLDS})
    frags = open_ds(directory.volumes / "fragments")[layout.roi]
    return {t: LookUpTable.open(directory.lut(Waterz.table("hist_quant_50", t))).map(frags) for t in THRESHOLDS}, labels


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_eight_blocks_equal_one_block_on_the_same_affinities(tmp_path, labels, epsilon):
    eight, truth = postprocess(tmp_path / "eight", labels, [200, 800, 800], epsilon)
    one, _ = postprocess(tmp_path / "one", labels, [400, 1600, 1600], epsilon)
    frags = open_ds(tmp_path / "eight" / "volumes.zarr" / "fragments")
    assert len(np.unique(frags[frags.roi])) > 200  # a real agglomeration problem
    for t in THRESHOLDS:
        assert evaluate_arrays(eight[t], one[t])["arand"] < 0.02
        # and the segmentation is a good one: the machinery loses nothing
        assert evaluate_arrays(one[t], truth)["arand"] < 0.05
