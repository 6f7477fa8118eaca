"""Inputs are what they claim to be: float affinities are probabilities, a
raw volume has all its chunks, a volume rewritten in place is another
volume, and both predict.py and evaluate.py check the ground truth before
any work. Each case once ran to a wrong result (or a flood of worker
tracebacks) instead of one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from funlib.persistence import open_ds, prepare_ds

from pipeline.config import RunConfig, load_json
from pipeline.orchestration.job import open_run
from tests.conftest import RAW, assert_one_line_error, run_cli
from tests.test_config_errors import NEAREST, broken

# broken()'s ROI: sections 120..159, y and x 0..79 (voxels), at 10 nm
ROI_OFFSET, ROI_SHAPE = (1200, 0, 0), (40, 80, 80)


def given_affinities(tmp_path, values: np.ndarray) -> dict:
    path = tmp_path / "given.zarr" / "affs"
    affs = prepare_ds(path, shape=values.shape, offset=ROI_OFFSET, voxel_size=(10, 10, 10), dtype=values.dtype,
                      chunk_shape=(3, 20, 40, 40), mode="w")
    affs[affs.roi] = values
    return {"model": None, "affinities": {"dataset": str(path), "offsets": NEAREST}}


def probabilities() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (3, *ROI_SHAPE)).astype(np.float32)


@pytest.mark.parametrize("scale, shown", [
    (lambda a: a * 255, "holds "),  # a 0..255 scale: was clipped to one segment
    (lambda a: a * 2 - 1, "holds -"),  # [-1, 1]: was clipped to no segment
])
def test_float_affinities_outside_0_1_are_refused_before_the_run(scale, shown, tmp_path, labels):
    config = broken(tmp_path, labels, **given_affinities(tmp_path, scale(probabilities())))
    result = run_cli("pipeline/predict.py", str(config))
    assert_one_line_error(result, "float affinities must be probabilities in [0, 1]")
    assert f"affinities: {tmp_path / 'given.zarr' / 'affs'} at " in result.stderr and shown in result.stderr
    assert not (tmp_path / "run" / "volumes.zarr").exists()


def test_a_nan_affinity_away_from_the_masters_samples_fails_its_block_naming_it(tmp_path, labels):
    values = probabilities()
    # outside the nine 16-voxel cubes the master samples (corners, centre)
    values[0, 20, 8, 40] = np.nan
    # one block, two workers: its three attempts are what takes the time
    config = broken(tmp_path, labels, **given_affinities(tmp_path, values),
                    postprocess={"block_shape": [400, 800, 800], "context": [30, 50, 50], "workers": 2})
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 1, result.stderr[-2000:]
    failure = next(line for line in result.stderr.splitlines() if line.startswith("affseg: run failed"))
    assert "fragments: 1 of 1 blocks did not finish" in failure and "holds nan (1 values outside [0, 1])" in failure, failure
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.fixture
def raw_copy(tmp_path):
    raw = tmp_path / "raw.zarr" / "raw"
    shutil.copytree(RAW, raw)
    return raw


def test_a_missing_raw_chunk_is_refused_naming_it_unless_missing_chunks_are_empty(raw_copy, tmp_path, labels):
    # sections 128..159, y and x 64..127: inside the ROI, none of the master's samples
    (raw_copy / "2" / "1" / "1").unlink()
    config = broken(tmp_path, labels, raw=str(raw_copy))
    assert_one_line_error(run_cli("pipeline/predict.py", str(config)), f"raw: chunk {raw_copy / '2/1/1'} is missing")
    sparse = broken(tmp_path, labels, raw=str(raw_copy), raw_missing_chunks="empty")
    layout, _ = open_run(RunConfig(**load_json(sparse)))
    assert layout.roi.offset == ROI_OFFSET


def test_a_raw_chunk_missing_when_a_block_reads_it_fails_the_block_naming_it(raw_copy, tmp_path):
    """The master's listing saw it; a block that reads raw after the chunk
    went (another process deleting it) is not given zeros either."""
    from funlib.geometry import Roi

    from pipeline.storage.volumes import VolumeReadError
    from workers.predict import read_raw

    raw = open_ds(raw_copy)
    (raw_copy / "2" / "1" / "1").unlink()
    with pytest.raises(VolumeReadError, match="its chunk .*2/1/1 is missing"):
        read_raw(raw, Roi((1280, 700, 700), (100, 100, 100)), "raw", "zero")
    assert not read_raw(raw, Roi((1280, 700, 700), (100, 100, 100)), "raw", "zero", missing="empty").any()


def test_raw_rewritten_in_place_away_from_the_sampled_cubes_is_refused(raw_copy, tmp_path, labels):
    config = broken(tmp_path, labels, raw=str(raw_copy))
    open_run(RunConfig(**load_json(config)))
    # chunk 2/1/1 holds none of the nine cubes the sample digest reads
    raw = open_ds(raw_copy, mode="r+")
    from funlib.geometry import Roi

    spot = Roi((1300, 700, 700), (20, 20, 20))
    raw[spot] = 255 - raw[spot]
    assert_one_line_error(run_cli("pipeline/predict.py", str(config)), "was made with raw = ")


def _gt_of_another_voxel_size(tmp_path, labels):
    gt = open_ds(labels)
    other = prepare_ds(tmp_path / "other.zarr" / "labels", shape=gt.shape, voxel_size=(20, 10, 10), dtype=gt.dtype)
    other[other.roi] = gt[gt.roi]
    return str(tmp_path / "other.zarr" / "labels"), "ground_truth: voxel size (20, 10, 10) differs from raw's (10, 10, 10)"


def _all_zero_gt(tmp_path, labels):
    gt = open_ds(labels)
    empty = prepare_ds(tmp_path / "empty.zarr" / "labels", shape=gt.shape, voxel_size=gt.voxel_size, dtype=gt.dtype)
    empty[empty.roi] = 0
    return str(tmp_path / "empty.zarr" / "labels"), "labels no voxel inside the run's ROI"


def _gt_with_a_missing_chunk(tmp_path, labels):
    shutil.copytree(labels, tmp_path / "holed.zarr" / "labels")
    # sections 128..159, y and x 0..63: inside the ROI
    (tmp_path / "holed.zarr" / "labels" / "2" / "0" / "0").unlink()
    return str(tmp_path / "holed.zarr" / "labels"), "ground_truth: chunk "


@pytest.mark.parametrize("make", [_gt_of_another_voxel_size, _all_zero_gt, _gt_with_a_missing_chunk])
def test_predict_and_evaluate_check_the_ground_truth_alike_before_any_work(make, tmp_path, labels):
    bad, message = make(tmp_path, labels)
    good = broken(tmp_path, labels)
    open_run(RunConfig(**load_json(good)))
    config = broken(tmp_path, labels, ground_truth=bad)
    for command in ("pipeline/evaluate.py", "pipeline/predict.py"):
        assert_one_line_error(run_cli(command, str(config)), message)
    assert not (tmp_path / "run" / "evaluation").exists() and not (tmp_path / "run" / "logs" / "evaluate").exists()


def ome_zarr(tmp_path, axes: list[dict], scale: list[float], data: np.ndarray) -> str:
    """An OME-Zarr (NGFF 0.4) image as other tools write it: no funlib
    attributes, the geometry in the group's multiscales."""
    import zarr

    group = zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="w")
    group.create_dataset("0", data=data, chunks=(64,) * data.ndim)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]
    return str(tmp_path / "image.ome.zarr" / "0")


SPACE_UM = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]


def test_ome_zarr_raw_is_read_with_its_scale(tmp_path, labels):
    raw = open_ds(RAW)
    path = ome_zarr(tmp_path, SPACE_UM, [0.01, 0.01, 0.01], raw[raw.roi])
    layout, _ = open_run(RunConfig(**load_json(broken(tmp_path, labels, raw=path))))
    assert tuple(layout.voxel_size) == (10, 10, 10) and tuple(layout.roi.offset) == ROI_OFFSET


def _in_a_group_with_damaged_attributes(tmp_path) -> str:
    shutil.copytree(RAW, tmp_path / "group.zarr" / "raw")
    (tmp_path / "group.zarr" / ".zattrs").write_text("{not json")
    return str(tmp_path / "group.zarr" / "raw")


@pytest.mark.parametrize("make, message", [
    (lambda t: ome_zarr(t, [{"name": "t", "type": "time"}, *SPACE_UM], [1, 0.01, 0.01, 0.01], np.zeros((2, 8, 8, 8), np.uint8)),
     "is an OME-Zarr image with axes ['t', 'z', 'y', 'x']; affseg reads 3 space axes"),
    (lambda t: ome_zarr(t, SPACE_UM, [0.0105, 0.01, 0.01], np.zeros((8, 8, 8), np.uint8)),
     "its OME-Zarr voxel size [10.5, 10.0, 10.0] nm is not a whole number of nm"),
    (lambda t: _in_a_group_with_damaged_attributes(t), "its group's .zattrs is not JSON"),
    (lambda t: str(prepare_ds(t / "deep.zarr" / "raw", shape=(160, 250, 250), voxel_size=(10, 10, 10), dtype=np.uint16) and t / "deep.zarr" / "raw"),
     "has dtype uint16, expected uint8; affseg predicts and trains on 8-bit raw: convert it with pipeline/ingest.py SOURCE --percentiles"),
])
def test_raw_that_affseg_cannot_read_as_it_is_is_one_line(make, message, tmp_path, labels):
    assert_one_line_error(run_cli("pipeline/predict.py", str(broken(tmp_path, labels, raw=make(tmp_path)))), message)


def test_a_zarr_array_without_a_voxel_size_is_refused(tmp_path, labels):
    """funlib reads it with voxel size 1, and the errors then blamed the ROI."""
    import zarr

    zarr.open_array(str(tmp_path / "plain.zarr" / "raw"), mode="w", shape=(160, 250, 250), dtype=np.uint8)
    assert_one_line_error(run_cli("pipeline/predict.py", str(broken(tmp_path, labels, raw=str(tmp_path / "plain.zarr" / "raw")))),
                          "records no voxel size (neither funlib's voxel_size and offset attributes nor OME-Zarr multiscales)")
