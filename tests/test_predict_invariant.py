"""Block-wise prediction over many blocks equals one single pass over the
whole volume with the same valid-padding network, up to uint8 rounding."""

from __future__ import annotations


import daisy
import numpy as np
import torch
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from networks.models import build_network, load_model, save_model
from pipeline.config import RunConfig
from pipeline.predict import open_run
from pipeline.tasks import blockwise_geometry
from tests.conftest import RAW
from workers.loop import WorkerRun
from workers.predict import predict_roi, setup


def test_blockwise_prediction_equals_single_pass(tmp_path):
    torch.manual_seed(0)
    spec = {"name": "mala_unet", "num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]]
    network = build_network(spec, offsets)
    checkpoint = tmp_path / "net.pt"
    save_model(checkpoint, spec, offsets, network.state_dict())

    # an ROI that is not a multiple of the block, so edge blocks overhang
    config = RunConfig(
        run_dir=str(tmp_path / "run"),
        raw=str(RAW),
        roi={"offset": [500, 300, 200], "shape": [300, 540, 460]},
        model={"checkpoint": str(checkpoint)},
        predict={"device": "cpu", "output_shape": [8, 16, 16]},
        postprocess={"block_shape": [300, 540, 460], "context": [10, 10, 10]},
    )
    network = load_model(checkpoint)
    layout, run_dir = open_run(config)
    run = WorkerRun(config, layout, run_dir)
    with setup(run) as process_block:
        task = daisy.Task(
            "predict", *blockwise_geometry(layout, layout.predict_output, layout.predict_context),
            process_function=process_block, read_write_conflict=False, fit="overhang", max_retries=0,
        )
        assert daisy.run_blockwise([task], multiprocessing=False, progress=False, summary=False)
    n_blocks = int(np.prod([-(-s // b) for s, b in zip(layout.roi.shape, layout.predict_output)]))
    assert n_blocks >= 20

    blockwise = open_ds(run_dir.volumes / "affs")[layout.roi]
    vs = layout.voxel_size
    whole_output = Coordinate(network.geometry.valid_output_shape(layout.roi.shape / vs)) * vs
    raw = open_ds(RAW)
    single = predict_roi(network, raw, Roi(layout.roi.offset, whole_output), layout.predict_context, "cpu")
    single = single[(slice(None), *(slice(0, s) for s in layout.roi.shape / vs))]

    assert blockwise.shape == single.shape
    difference = np.abs(blockwise.astype(int) - single.astype(int))
    assert difference.max() <= 1, "block-wise prediction differs beyond uint8 rounding"
    assert (difference > 0).mean() < 0.01
    assert blockwise.std() > 1  # the network says something, not a constant
