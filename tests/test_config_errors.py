"""Bad input gives one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.conftest import RAW, run_cli


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


CASES = {
    "unknown key": ({"postprocess__blok_shape": [1, 1, 1]}, "postprocess.blok_shape: unknown key"),
    "unknown top-level key": ({"thresholds": [0.5]}, "thresholds: unknown key"),
    "missing container": ({"raw": "/nowhere/sample.zarr/raw"}, "raw: container /nowhere/sample.zarr does not exist"),
    "missing dataset": ({"raw": str(RAW.parent / "nope")}, "raw: dataset 'nope' not found"),
    "wrong dtype": ({"raw": "GT"}, "has dtype uint64, expected uint8"),
    "block not a voxel multiple": ({"postprocess__block_shape": [200, 405, 400]}, "not a multiple of the voxel size"),
    "volume smaller than a block": ({"postprocess__block_shape": [800, 400, 400]}, "smaller than one block"),
    "unreachable mongodb": ({"store": "mongodb://127.0.0.1:9/affseg"}, "cannot reach MongoDB at mongodb://127.0.0.1:9/affseg"),
    "not a store": ({"store": "postgres://x"}, "store: 'postgres://x' is neither"),
    "threshold listed twice": ({"agglomerate": {"thresholds": [0.3, 0.3], "threshold": 0.3}}, "lists a value twice"),
    "threshold not listed": ({"agglomerate": {"thresholds": [0.3], "threshold": 0.5}}, "must be one of thresholds"),
    "epsilon above thresholds": (
        {"fragments": {"epsilon_agglomerate": 0.4}, "agglomerate": {"thresholds": [0.3, 0.5], "threshold": 0.5}},
        "config: fragments.epsilon_agglomerate 0.4 is above the smallest agglomerate threshold 0.3",
    ),
    "negative shape": ({"roi": {"offset": [0, 0, 0], "shape": [-1, 10, 10]}}, "roi.shape.0"),
    "offsets an affinity model lacks": (
        {"model": {"baseline": "intensity", "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -5]]}},
        "model.offsets: an affinity model gives only its training offsets",
    ),
    "extra output the model lacks": ({"predict": {"extra_outputs": ["embedding"]}}, "predict.extra_outputs: this model has no output 'embedding'"),
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


@pytest.mark.parametrize("script", ["predict", "train", "ingest", "status", "evaluate"])
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


def test_a_2d_model_needs_blocks_of_whole_sections(tmp_path, labels):
    from tests.conftest import save_affinity_model

    spec = {"name": "residual_unet", "dims": 2, "widths": [4, 6], "downsample_factors": [[1, 2, 2]], "crop": [0, 2, 2]}
    offsets = [[0, -1, 0], [0, 0, -1], [0, -3, 0]]
    save_affinity_model(tmp_path / "model2d.pt", spec, offsets)
    result = run_cli("pipeline/predict.py", str(broken(tmp_path, labels, model={"checkpoint": str(tmp_path / "model2d.pt")})))
    assert result.returncode == 2, result.stderr
    assert "a 2D model's sections are segmented whole" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
