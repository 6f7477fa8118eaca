"""Block-wise post-processing is exact: on the same affinities, 8 blocks give
the segmentation of one block covering the whole volume.

The affinities here are those of the sample's ground truth with Gaussian
noise, so that waterz makes thousands of fragments and a real merge tree.
With the bundled network's predicted affinities the same comparison is made
end to end in test_main_job.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import daisy
import numpy as np
import pytest
from funlib.persistence import open_ds

from pipeline.config import RunConfig
from pipeline.storage.graph_store import open_store
from pipeline.kernels.lut import LookUpTable
from pipeline.evaluation.metrics import evaluate_arrays
from pipeline.orchestration.job import open_run
from pipeline.orchestration.tasks import step_geometry
from tests.conftest import RAW, TEST_ROI, noisy_ground_truth_affinities
from workers.loop import WorkerRun

THRESHOLDS = (0.3, 0.5, 0.7)


def postprocess(run_dir: Path, labels_path: str, block_shape, context=(100, 300, 300), **settings) -> tuple[dict, np.ndarray]:
    """Each row's segmentation (row label -> volume) of the run's
    partitioner on noisy ground-truth affinities, and the ground truth: its
    block steps run here, one block after another, then its tables."""
    config = RunConfig(
        run_dir=str(run_dir), raw=str(RAW), ground_truth=labels_path, roi=TEST_ROI,
        agglomerate={"thresholds": list(THRESHOLDS), "threshold": 0.5},
        postprocess={"block_shape": block_shape, "context": list(context)},
        **{"model": {"checkpoint": str(Path(__file__).parent.parent / "models/fib25_mala.pt")}, **settings},
    )
    layout, directory = open_run(config)
    labels = open_ds(labels_path)[layout.roi]
    affs = open_ds(directory.volumes / "affs", mode="r+")
    affs[layout.roi] = noisy_ground_truth_affinities(labels, layout.offsets, noise=0.2)

    run = WorkerRun(config, layout, directory)
    partitioner = layout.partitioner

    def blockwise(step: str) -> None:
        with importlib.import_module(f"workers.{step}").setup(run) as process_block:
            task = daisy.Task(
                step, *step_geometry(layout, step)[:3],
                process_function=process_block, read_write_conflict=False, fit="shrink", max_retries=0,
            )
            assert daisy.run_blockwise([task], multiprocessing=False, progress=False, summary=False)

    for step in partitioner.pipelined:
        blockwise(step)
    with open_store("sqlite", run_dir, directory.run_id()) as store:
        partitioner.build_tables(config, layout, directory, store)
    partitioner.before_resume(config, directory)
    blockwise(partitioner.relabel_step)
    frags = open_ds(directory.volumes / "fragments")[layout.roi]
    segmentation = open_ds(directory.volumes / "segmentation")[layout.roi]
    return {row.threshold: segmentation if row.table is None else LookUpTable.open(directory.lut(row.table)).map(frags)
            for row in partitioner.rows(config)}, labels


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_eight_blocks_equal_one_block_on_the_same_affinities(tmp_path, labels, epsilon):
    eight, truth = postprocess(tmp_path / "eight", labels, [200, 800, 800], fragments={"epsilon_agglomerate": epsilon})
    one, _ = postprocess(tmp_path / "one", labels, [400, 1600, 1600], fragments={"epsilon_agglomerate": epsilon})
    frags = open_ds(tmp_path / "eight" / "volumes.zarr" / "fragments")
    assert len(np.unique(frags[frags.roi])) > 200  # a real agglomeration problem
    for t in THRESHOLDS:
        assert evaluate_arrays(eight[t], one[t])["arand"] < 0.02
        # and the segmentation is a good one: the machinery loses nothing
        assert evaluate_arrays(one[t], truth)["arand"] < 0.05


def test_the_3d_mutex_watershed_in_eight_blocks_equals_one_block(tmp_path, labels):
    """mutex_3d: mutex fragments per block, the region graph of every pair an
    offset links (the model's offsets up to 9 voxels; the graph step's context reaches the
    longest by itself), the graph mutex watershed on the master. The methods
    notes' split: the nearest neighbours only attract and the long-range
    offsets only repel, so the objects stay apart by the long-range
    evidence alone."""
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -3, 0], [0, 0, -3], [-9, 0, 0], [0, -9, 0], [0, 0, -9]]
    split = {"partition": "mutex_3d", "mutex": {"biases": [0.0] * 3 + [1.0] * 6},
             "model": {"checkpoint": str(Path(__file__).parent.parent / "models/fib25_mala.pt"), "offsets": offsets}}
    eight, truth = postprocess(tmp_path / "eight", labels, [200, 800, 800], (30, 30, 30), **split)
    one, _ = postprocess(tmp_path / "one", labels, [400, 1600, 1600], (30, 30, 30), **split)
    frags = open_ds(tmp_path / "eight" / "volumes.zarr" / "fragments")
    assert len(np.unique(frags[frags.roi])) > 8  # blocks cut objects: the graph must join them
    (row,) = eight
    assert evaluate_arrays(eight[row], one[row])["arand"] < 0.02
    assert evaluate_arrays(one[row], truth)["arand"] < 0.05


def test_the_3d_mutex_fragments_see_no_voxels_beyond_the_affinities(tmp_path, labels):
    """A block's context reaching beyond the affinities (here: the run's
    ROI is a slab of the volume, and the predicted affinities cover the ROI
    only) adds no voxels: one block over the ROI with a context has the
    fragments of the mutex watershed of the ROI's affinities alone. Read
    as affinity 0, such voxels' long-range pairs were the strongest
    repulsions of the block and cut the bodies along the slab's faces."""
    from pipeline.kernels.mutex import block_tie_seed, long_range_strides, mutex_watershed
    from pipeline.kernels.watershed import relabel_consecutive

    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -3, 0], [0, 0, -3], [-9, 0, 0], [0, -9, 0], [0, 0, -9]]
    settings = {"partition": "mutex_3d", "mutex": {"biases": [0.0] * 3 + [1.0] * 6},
                "model": {"checkpoint": str(Path(__file__).parent.parent / "models/fib25_mala.pt"), "offsets": offsets}}
    postprocess(tmp_path / "one", labels, [400, 1600, 1600], (90, 90, 90), **settings)
    config = RunConfig(**json.loads((tmp_path / "one" / "config.json").read_text()))
    affs = open_ds(tmp_path / "one" / "volumes.zarr" / "affs")
    fragments = open_ds(tmp_path / "one" / "volumes.zarr" / "fragments")
    assert fragments.roi == affs.roi  # the slab: context beyond it on every side
    alone = mutex_watershed(affs[affs.roi], offsets, config.mutex.channel_biases(len(offsets)),
                            long_range_strides(offsets, config.mutex.long_range_stride),
                            tie_seed=block_tie_seed(config.mutex.seed, 0))
    np.testing.assert_array_equal(relabel_consecutive(fragments[fragments.roi])[0], relabel_consecutive(alone)[0])
