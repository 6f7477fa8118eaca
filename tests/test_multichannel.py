"""Colour (multi-channel) raw end to end, on the bundled RGB sample
(data/nuclei_u2os_rgb): ingest keeps the channels, training feeds them to a
network with `in_channels: 3`, predict reads them, and a model of another
channel count is refused in one line. Colour raw used to be refused by
ingest ("sections must be single-channel"), palette labels read as RGB."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
from funlib.persistence import open_ds

from tests.conftest import REPO, assert_one_line_error, run_cli

RGB = REPO / "data/nuclei_u2os_rgb"
OFFSETS_2D = [[0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3], [0, -9, 0], [0, 0, -9]]


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> tuple[str, str]:
    container = tmp_path_factory.mktemp("rgb") / "rgb.zarr"
    for name, kind in (("image", ()), ("labels", ("--labels",))):
        result = run_cli("pipeline/ingest.py", str(RGB / name), *kind, "--out", str(container / name),
                         "--voxel-size", "1", "1", "1", "--chunk-shape", "1", "256", "320")
        assert result.returncode == 0, result.stderr
    return str(container / "image"), str(container / "labels")


def test_ingest_keeps_the_colour_channels_and_the_palette_ids(rgb):
    raw, labels = open_ds(rgb[0]), open_ds(rgb[1])
    assert raw.shape == (3, 2, 256, 320) and raw.channel_dims == 1 and list(raw.axis_names) == ["c^", "z", "y", "x"]
    assert tuple(raw.voxel_size) == (1, 1, 1)
    for z in range(2):
        np.testing.assert_array_equal(np.moveaxis(raw[raw.roi][:, z], 0, -1), iio.imread(RGB / "image" / f"{z:02d}.png"))
        np.testing.assert_array_equal(labels[labels.roi][z], iio.imread(RGB / "labels" / f"{z:02d}.png", mode="P"))
    assert [len(np.unique(section)) - 1 for section in labels[labels.roi]] == [50, 36]


def _network(channels: int) -> dict:
    return {"name": "residual_unet", "dims": 2, "in_channels": channels, "widths": [4, 6, 8, 10, 12], "crop": [0, 8, 8]}


def _train(tmp_path, rgb, channels: int):
    config = {
        "experiment_dir": str(tmp_path / "experiment"),
        "volumes": [{"raw": rgb[0], "labels": rgb[1]}],
        "network": _network(channels),
        "offsets": OFFSETS_2D,
        "output_shape": [1, 64, 64],
        "iterations": 2,
        "augment": {"elastic": {"control_point_spacing": [1, 20, 20], "jitter_sigma": [0, 2, 2]}, "defects": None},
        "precache_workers": 0,
        "device": "cpu",
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    return run_cli("pipeline/train.py", str(path))


def _predict_config(tmp_path, rgb, checkpoint) -> str:
    config = {
        "run_dir": str(tmp_path / "run"),
        "raw": rgb[0],
        "ground_truth": rgb[1],
        "model": {"checkpoint": str(checkpoint)},
        "predict": {"device": "cpu", "output_shape": [1, 128, 160], "outside": "mirror"},
        "postprocess": {"block_shape": [1, 256, 320], "context": [0, 0, 0]},
    }
    path = tmp_path / "predict.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_a_three_channel_network_trains_on_colour_raw_and_its_model_segments_it(rgb, tmp_path):
    result = _train(tmp_path, rgb, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    model = tmp_path / "experiment" / "model.pt"
    result = run_cli("pipeline/predict.py", _predict_config(tmp_path, rgb, model))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"]["predict"]["completed"] == report["steps"]["predict"]["blocks"] > 0
    segmentation = open_ds(tmp_path / "run" / "volumes.zarr" / "segmentation")
    assert segmentation.shape == (2, 256, 320) and segmentation[segmentation.roi].any()
    assert {"aji", "pq"} <= set(report["scores"][0])


def test_a_model_or_network_of_another_channel_count_is_one_line(rgb, tmp_path):
    single = REPO / "models" / "nuclei_pea.pt"
    assert_one_line_error(run_cli("pipeline/predict.py", _predict_config(tmp_path, rgb, single)),
                          "model: it reads 1-channel raw, and raw has 3 channel(s) (shape (3, 2, 256, 320))")
    assert_one_line_error(_train(tmp_path, rgb, 1), "volumes.0.raw: ")
    assert "has 3 channel(s) (shape (3, 2, 256, 320)), the network reads 1 (network.in_channels)" in _train(tmp_path, rgb, 1).stderr
