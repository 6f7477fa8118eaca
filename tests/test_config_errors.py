"""Bad input gives one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MODEL, RAW, assert_one_line_error, run_cli


def broken(tmp_path, labels, **changes):
    config = {
        "run_dir": str(tmp_path / "run"),
        "raw": str(RAW),
        "ground_truth": labels,
        "roi": {"offset": [1200, 0, 0], "shape": [400, 800, 800]},
        "model": {"baseline": "intensity"},
        "postprocess": {"block_shape": [200, 400, 400], "context": [30, 50, 50]},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


NEAREST = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]

CASES = {
    "unknown key": ({"postprocess__blok_shape": [1, 1, 1]}, "postprocess.blok_shape: unknown key"),
    "unknown top-level key": ({"thresholds": [0.5]}, "thresholds: unknown key"),
    "missing container": ({"raw": "/nowhere/sample.zarr/raw"}, "raw: container /nowhere/sample.zarr does not exist"),
    "missing dataset": ({"raw": str(RAW.parent / "nope")}, "raw: dataset 'nope' not found"),
    "wrong dtype": ({"raw": "GT"}, "has dtype uint64, expected uint8"),
    "block not a voxel multiple": ({"postprocess__block_shape": [200, 405, 400]}, "not a multiple of the voxel size"),
    "volume smaller than a block": ({"postprocess__block_shape": [800, 400, 400]}, "smaller than one block"),
    "unreachable mongodb": ({"store": "mongodb://127.0.0.1:9/affseg", "store_timeout_s": 1}, "cannot reach MongoDB at mongodb://127.0.0.1:9/affseg"),
    "not a store": ({"store": "postgres://x"}, "store: 'postgres://x' is neither"),
    "sqlite on a cluster": ({"launcher": {"kind": "slurm"}}, "store: SQLite with the slurm launcher is refused"),
    "in_process with workers": ({"launcher": {"kind": "in_process"}, "postprocess__workers": 2},
                                "launcher.kind in_process runs one block at a time in the master process: "
                                "predict.workers (1) and postprocess.workers (2) must be 1"),
    "threshold listed twice": ({"agglomerate": {"thresholds": [0.3, 0.3], "threshold": 0.3}}, "lists a value twice"),
    "threshold not listed": ({"agglomerate": {"thresholds": [0.3], "threshold": 0.5}}, "must be one of thresholds"),
    "epsilon above thresholds": (
        {"fragments": {"epsilon_agglomerate": 0.4}, "agglomerate": {"thresholds": [0.3, 0.5], "threshold": 0.5}},
        "config: fragments.epsilon_agglomerate 0.4 is above the smallest agglomerate threshold 0.3",
    ),
    "roi outside the volume": ({"roi": {"offset": [1200, 0, 0], "shape": [800, 800, 800]}}, "is not inside the raw volume"),
    "roi off the voxel grid": ({"roi": {"offset": [1205, 0, 0], "shape": [400, 800, 800]}}, "is not a multiple of the voxel size"),
    "negative shape": ({"roi": {"offset": [0, 0, 0], "shape": [-1, 10, 10]}}, "roi.shape.0"),
    "offsets an affinity model lacks": (
        {"model": {"baseline": "intensity", "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -5]]}},
        "model.offsets: an affinity model gives only its training offsets",
    ),
    "extra output the model lacks": ({"predict": {"extra_outputs": ["embedding"]}}, "predict.extra_outputs: this model has no output 'embedding'"),
    "model and affinities": (
        {"affinities": {"dataset": str(RAW), "offsets": NEAREST}}, "give exactly one of model (predict the affinities) or affinities",
    ),
    "affinities not 4D": (
        {"model": None, "affinities": {"dataset": str(RAW), "offsets": NEAREST}},
        "affinities: expected a 4D (offset, z, y, x) dataset with one channel per offset (3), got shape (160, 250, 250)",
    ),
    "mutex_2d on a 3D model": (
        {"partition": "mutex_2d"}, "partition: mutex_2d partitions each section alone and needs in-plane offsets",
    ),
    "random strides without a stride": ({"mutex": {"randomized_strides": True}}, "randomized_strides needs long_range_stride"),
    "unknown partitioner": ({"partition": "mutex"}, "partition: Input should be 'waterz', 'mutex_2d' or 'mutex_3d'"),
    "given output no step reads": (
        {"model": None, "affinities": {"dataset": str(RAW), "offsets": NEAREST, "outputs": {"embedding": str(RAW)}}},
        "affinities.outputs.embedding.[key]: Input should be 'foreground' or 'uncertainty'",
    ),
    "affinities offsets out of order": (
        {"model": None, "affinities": {"dataset": str(RAW), "offsets": NEAREST[::-1]}},
        "affinities.offsets: the first three offsets must be [-1,0,0], [0,-1,0], [0,0,-1]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line_and_exit_2(case, tmp_path, labels):
    changes, message = CASES[case]
    if changes.get("raw") == "GT":
        changes = {"raw": labels}
    result = run_cli("pipeline/predict.py", str(broken(tmp_path, labels, **changes)))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("affseg: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "run" / "layout.json").exists()


def test_missing_and_malformed_config_files(tmp_path):
    result = run_cli("pipeline/predict.py", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("pipeline/predict.py", str(bad))
    assert result.returncode == 2 and "not valid JSON" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["predict", "train", "ingest", "status", "evaluate", "view"])
def test_every_command_has_help(script):
    result = run_cli(f"pipeline/{script}.py", "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


TRAIN_CASES = {
    "2D offsets with z": (
        {"network": {"name": "residual_unet", "dims": 2}, "offsets": [[0, -1, 0], [0, 0, -1], [-1, 0, 0]]},
        "offsets of a 2D network",
    ),
    "crop off the pooling grid": (
        {"network": {"name": "residual_unet", "widths": [4, 6], "downsample_factors": [[1, 4, 4]], "crop": [0, 1, 1]}},
        "multiple of the total downsampling",
    ),
    "unknown backbone": ({"network": {"name": "vgg"}}, "network: "),
    "unknown augmentation key": ({"augment": {"elastc": None}}, "augment.elastc: unknown key"),
    "defect probabilities over 1": (
        {"augment": {"defects": {"prob_missing": 0.6, "prob_low_contrast": 0.5}}},
        "the defect probabilities add up to 1.1",
    ),
    "artifact volume missing": (
        {"augment": {"defects": {"artifacts": {"raw": "nowhere.zarr/raw", "alpha": "nowhere.zarr/alpha"}}}},
        "augment.defects.artifacts.raw",
    ),
    "unreachable output alignment": (
        {"network": {"name": "mala_unet", "num_fmaps": 2, "downsample_factors": [[1, 3, 3], [1, 3, 3]]}},
        "network: no output of at least",
    ),
    "unknown method": ({"method": {"name": "magic"}}, "method: Input tag 'magic'"),
    "unknown method key": ({"method": {"name": "embedding", "dims": 8}}, "method.embedding.dims: unknown key"),
    "unknown ccm key": ({"method": {"name": "embedding", "ccm": {"cutouts": 3}}}, "method.embedding.ccm.cutouts: unknown key"),
    "every term off": (
        {"method": {"name": "embedding", "scm": False, "ccm": None, "epm": None}},
        "switch on at least one of scm, ccm and epm",
    ),
    "embedding pyramid on a valid network": (
        {"method": {"name": "embedding"}}, "method.epm needs a backbone with decoder levels (residual_unet)",
    ),
    "pyramid deeper than the backbone": (
        {"method": {"name": "embedding", "epm": {"ranges": [3, 1, 1]}},
         "network": {"name": "residual_unet", "widths": [4, 6, 8], "downsample_factors": [[2, 2, 2], [2, 2, 2]], "crop": [4, 4, 4]}},
        "method.epm.ranges has 3 levels, the backbone 2",
    ),
    "background pairs without a foreground head": (
        {"method": {"name": "embedding", "background_pairs": False}},
        "background_pairs: false needs a foreground head",
    ),
    "embedding dimension 1": ({"method": {"name": "embedding", "dim": 1}}, "method.embedding.dim: Input should be greater than 1"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_config_is_one_line_and_exit_2(case, tmp_path, labels):
    changes, message = TRAIN_CASES[case]
    config = {
        "experiment_dir": str(tmp_path / "experiment"),
        "volumes": [{"raw": str(RAW), "labels": labels}],
        "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
        "iterations": 1,
        **changes,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    result = run_cli("pipeline/train.py", str(path), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("changes, message", [
    ({}, "postprocess.block_shape: a 2D model's sections are segmented whole"),
    ({"partition": "waterz"}, "partition: waterz agglomerates 3D affinities; these offsets are all in-plane"),
    ({"mutex": {"biases": [0.5, 0.5]}}, "partition: mutex.biases has 2 values and the run 3 offsets: give one per offset"),
])
def test_a_2d_model_needs_blocks_of_whole_sections_and_a_2d_partitioner(changes, message, tmp_path, labels):
    from tests.conftest import save_affinity_model

    spec = {"name": "residual_unet", "dims": 2, "widths": [4, 6], "downsample_factors": [[1, 2, 2]], "crop": [0, 2, 2]}
    offsets = [[0, -1, 0], [0, 0, -1], [0, -3, 0]]
    save_affinity_model(tmp_path / "model2d.pt", spec, offsets)
    config = broken(tmp_path, labels, model={"checkpoint": str(tmp_path / "model2d.pt")}, **changes)
    assert_one_line_error(run_cli("pipeline/predict.py", str(config)), message)


class _Code:
    """Pickles as a call: what the weights-only loader must refuse."""

    def __reduce__(self):
        return (print, ("code ran",))


def _checkpoint(kind: str, tmp_path):
    path = tmp_path / f"{kind}.pt"
    data = MODEL.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "code":
        model = torch.load(MODEL, weights_only=True)
        torch.save({**model, "hook": _Code()}, path)
    elif kind == "weights that do not fit":
        model = torch.load(MODEL, weights_only=True)
        torch.save({**model, "offsets": model["offsets"][:3]}, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a readable model file (empty, truncated or corrupt)"),
    ("empty", "is not a readable model file (empty, truncated or corrupt)"),
    ("random bytes", "is not a model file (not a PyTorch archive)"),
    ("code", "holds Python objects besides weights; affseg loads weights only and refuses it"),
    ("weights that do not fit", "its weights do not fit the network it records (3 offsets"),
])
def test_a_bad_checkpoint_is_one_line(kind, message, tmp_path, labels):
    path = _checkpoint(kind, tmp_path)
    result = run_cli("pipeline/predict.py", str(broken(tmp_path, labels, model={"checkpoint": str(path)})))
    assert_one_line_error(result, f"model.checkpoint: {path}")
    assert_one_line_error(result, message)
    assert "code ran" not in result.stdout + result.stderr
    assert "weights_only=False" not in result.stderr


def _gt_2d(tmp_path, labels):
    from funlib.persistence import open_ds, prepare_ds

    gt = open_ds(labels)
    flat = prepare_ds(tmp_path / "flat.zarr" / "labels", shape=gt.shape[1:], voxel_size=gt.voxel_size[1:], dtype=gt.dtype)
    flat[flat.roi] = gt[gt.roi][0]
    return {"ground_truth": str(tmp_path / "flat.zarr" / "labels")}


def _gt_off_grid(tmp_path, labels):
    from funlib.persistence import open_ds, prepare_ds

    gt = open_ds(labels)
    prepare_ds(tmp_path / "moved.zarr" / "labels", shape=gt.shape, offset=(5, 0, 0),
               voxel_size=gt.voxel_size, dtype=gt.dtype)
    return {"ground_truth": str(tmp_path / "moved.zarr" / "labels")}


def _run_dir_is_a_file(tmp_path, labels):
    (tmp_path / "file").write_text("")
    return {"run_dir": str(tmp_path / "file")}


def _run_dir_under_a_file(tmp_path, labels):
    (tmp_path / "file").write_text("")
    return {"run_dir": str(tmp_path / "file" / "run")}


@pytest.mark.parametrize("make, message", [
    (_gt_2d, "ground_truth: expected a 3D (z, y, x) label volume, got shape (250, 250)"),
    (_gt_off_grid, "ground_truth: its offset (5, 0, 0) is not a multiple of its voxel size (10, 10, 10)"),
    (_run_dir_is_a_file, "is a file, not a directory"),
    (_run_dir_under_a_file, "is a file, not a directory"),
])
def test_bad_inputs_are_refused_before_the_run(make, message, tmp_path, labels):
    result = run_cli("pipeline/predict.py", str(broken(tmp_path, labels, **make(tmp_path, labels))))
    assert_one_line_error(result, message)


@pytest.mark.parametrize("damage, message", [
    ("layout.json", "layout.json is damaged or from an older affseg"),
    ("graph.sqlite", "graph.sqlite is not a usable SQLite database"),
])
def test_a_damaged_run_directory_is_one_line(damage, message, tmp_path, labels):
    from pipeline.config import RunConfig, load_json
    from pipeline.orchestration.job import open_run

    config = broken(tmp_path, labels)
    open_run(RunConfig(**load_json(config)))
    (tmp_path / "run" / damage).write_bytes(b"\x00garbage{" * 100)
    assert_one_line_error(run_cli("pipeline/predict.py", str(config)), message)


def test_a_read_only_run_directory_is_one_line(tmp_path, labels):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # root writes through permission bits, not through the immutable flag
    lock = ["chattr", "+i"] if os.geteuid() == 0 else ["chmod", "555"]
    unlock = ["chattr", "-i"] if os.geteuid() == 0 else ["chmod", "755"]
    subprocess.run([*lock, str(run_dir)], check=True)
    try:
        assert_one_line_error(run_cli("pipeline/predict.py", str(broken(tmp_path, labels))), f"run_dir: cannot write in {run_dir}")
    finally:
        subprocess.run([*unlock, str(run_dir)], check=True)


def test_evaluating_a_threshold_without_a_table_is_one_line(tmp_path, labels):
    from pipeline.config import RunConfig, load_json
    from pipeline.orchestration.job import open_run

    config = broken(tmp_path, labels)
    open_run(RunConfig(**load_json(config)))
    assert_one_line_error(run_cli("pipeline/evaluate.py", str(config)), "the run has no look-up table for threshold 0.1")


def _train_config(tmp_path, labels, **changes) -> Path:
    config = {
        "experiment_dir": str(tmp_path / "experiment"),
        "volumes": [{"raw": str(RAW), "labels": labels}],
        "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
        "network": {"name": "mala_unet", "num_fmaps": 2, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2]]},
        "output_shape": [8, 8, 8],
        "augment": {"elastic": None, "defects": None},
        "precache_workers": 0,
        "iterations": 1,
        **changes,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    return path


def _labels_like_raw(tmp_path, name: str, fill: int, shape=None) -> str:
    from funlib.persistence import open_ds, prepare_ds

    raw = open_ds(RAW)
    out = prepare_ds(tmp_path / "l.zarr" / name, shape=shape or raw.shape, voxel_size=raw.voxel_size, dtype=np.uint64)
    out[out.roi] = fill
    return str(tmp_path / "l.zarr" / name)


@pytest.mark.parametrize("make, message", [
    # RandomLocation rejected every location: 0 it/s forever
    (lambda t: {"volumes": [{"raw": str(RAW), "labels": _labels_like_raw(t, "none", 0), "sparse": True}]},
     "volumes.0.labels: no voxel of the training ROI"),
    # trained and exported a model that had learnt "nothing is an object"
    (lambda t: {"volumes": [{"raw": str(RAW), "labels": _labels_like_raw(t, "zero", 0)}]},
     "volumes.0.labels: no voxel of the training ROI"),
    # a gunpowder assertion
    (lambda t: {"volumes": [{"raw": str(RAW), "labels": _labels_like_raw(t, "big", 1, (160, 300, 300))}]},
     "volumes.0: the training ROI [0:1600, 0:3000, 0:3000] (1600, 3000, 3000) (the labels', unless roi is given) is not inside raw's ROI"),
])
def test_training_data_that_cannot_train_is_one_line(make, message, tmp_path, labels):
    result = run_cli("pipeline/train.py", str(_train_config(tmp_path, labels, **make(tmp_path))), "--device", "cpu", timeout=300)
    assert_one_line_error(result, message)


def test_resuming_training_with_another_network_or_fewer_iterations_is_one_line(tmp_path, labels):
    assert run_cli("pipeline/train.py", str(_train_config(tmp_path, labels, iterations=2, save_every=2)), "--device", "cpu").returncode == 0
    # was a torch size-mismatch traceback
    other = _train_config(tmp_path, labels, iterations=4, offsets=[[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]])
    assert_one_line_error(run_cli("pipeline/train.py", str(other), "--device", "cpu"),
                          "experiment_dir: model_checkpoint_2 was trained with another network or offsets than this config")
    # was "trained iterations 2..1" and an export
    fewer = _train_config(tmp_path, labels, iterations=1, save_every=2)
    assert_one_line_error(run_cli("pipeline/train.py", str(fewer), "--device", "cpu"),
                          "holds a checkpoint at iteration 2, beyond iterations 1")
    again = run_cli("pipeline/train.py", str(_train_config(tmp_path, labels, iterations=2, save_every=2)), "--device", "cpu")
    assert again.returncode == 0 and "already trained to iteration 2" in again.stdout, again.stderr


def test_status_of_a_run_directory_without_a_run_is_one_line(tmp_path, labels):
    config = broken(tmp_path, labels)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "progress.jsonl").write_text("")
    assert_one_line_error(run_cli("pipeline/status.py", str(config)), "holds no run (no layout.json)")


def test_cuda_on_a_machine_without_one_is_refused_before_any_worker(tmp_path, labels):
    config = broken(tmp_path, labels, predict={"device": "cuda"})
    # no GPU visible, on any machine the tests run on
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    assert_one_line_error(run_cli("pipeline/predict.py", str(config), env=hidden),
                          "predict.device: 'cuda' was asked for, but torch sees no CUDA device")
    assert not (tmp_path / "run" / "logs" / "predict").exists()
