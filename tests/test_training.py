"""Training on the bundled data: the full augmentation pipeline for every
backbone in 3D and 2D, affinity targets, sparse-label masking and resuming."""

from __future__ import annotations

import gunpowder as gp
import numpy as np
import pytest
import torch
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from networks.losses import WeightedMSELoss
from pipeline.training.config import TrainConfig
from pipeline.methods import load_model
from pipeline.errors import UserError
from pipeline.training.loop import Training
from pipeline.training.gunpowder_pipeline import TrainingKeys, training_pipeline, training_request
from pipeline.storage.volumes import prepare_volume
from tests.conftest import RAW

OFFSETS_3D = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -9, 0], [0, 0, -27]]
OFFSETS_2D = [[0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3], [0, -9, 0], [0, 0, -27]]
# every augmentation on, with probabilities raised so that a few batches use them
FULL_AUGMENT = {
    "elastic": {"control_point_spacing": [4, 10, 10], "jitter_sigma": [0, 1, 1], "prob_slip": 0.2, "prob_shift": 0.2, "max_misalign": 3},
    "defects": {"prob_missing": 0.1, "prob_low_contrast": 0.1},
}
NO_AUGMENT = {"elastic": None, "mirror": False, "transpose": False, "intensity": None, "defects": None, "grow_boundary": 0}

BACKBONES = {
    "mala_unet": {"name": "mala_unet", "num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2]]},
    "residual_unet": {"name": "residual_unet", "widths": [4, 6, 8], "downsample_factors": [[2, 2, 2], [2, 2, 2]], "crop": [4, 4, 4]},
}


def fib25_config(tmp_path, labels, **overrides) -> TrainConfig:
    config = {
        "experiment_dir": str(tmp_path / "experiment"),
        "volumes": [{"raw": str(RAW), "labels": labels, "roi": {"offset": [0, 0, 0], "shape": [1200, 2500, 2500]}}],
        "network": BACKBONES["mala_unet"],
        "offsets": OFFSETS_3D,
        "output_shape": [12, 12, 12],
        "iterations": 3,
        "augment": FULL_AUGMENT,
        "precache_workers": 2,
        "save_every": 2,
        "snapshot_every": 2,
        "log_every": 1,
        "device": "cpu",
    }
    config.update(overrides)
    return TrainConfig(**config)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_3d_training_runs_the_full_pipeline(tmp_path, labels, backbone):
    config = fib25_config(tmp_path, labels, network=BACKBONES[backbone])
    training = Training(config, "cpu")
    assert training.run(config.iterations) == 0
    experiment = tmp_path / "experiment"
    assert (experiment / "model_checkpoint_2").exists()
    assert list((experiment / "tensorboard").iterdir())
    snapshot = zarr.open(str(next((experiment / "snapshots").iterdir())), "r")
    assert {"raw", "labels", "labels_mask", "target", "prediction"} <= set(snapshot.array_keys())
    assert training.export().exists()


def test_2d_training_runs_the_full_pipeline(tmp_path, isbi):
    raw, labels = isbi
    config = TrainConfig(
        experiment_dir=str(tmp_path / "experiment"),
        volumes=[{"raw": raw, "labels": labels}],
        network={"name": "residual_unet", "dims": 2, "widths": [4, 6, 8, 10, 12], "crop": [0, 8, 8]},
        offsets=OFFSETS_2D,
        output_shape=[1, 64, 64],
        iterations=3,
        augment={**FULL_AUGMENT, "elastic": {"control_point_spacing": [1, 20, 20], "jitter_sigma": [0, 2, 2]}},
        precache_workers=2,
        save_every=2,
        snapshot_every=0,
        device="cpu",
    )
    training = Training(config, "cpu")
    assert tuple(training.input_shape) == (1, 80, 80)
    assert training.run(config.iterations) == 0
    assert (tmp_path / "experiment" / "model_checkpoint_2").exists()


PEA_2D = {"name": "embedding", "dim": 8, "epm": {"ranges": [3, 1]}, "foreground": {}}


def test_pea_trains_on_independent_2d_images_with_an_isotropic_voxel_size(tmp_path, nuclei):
    """Nuclei pages ingested with voxel size 1 1 1: a 2D network never swaps
    z (which gunpowder could not satisfy), and every PEA term runs."""
    raw, labels = nuclei
    config = TrainConfig(
        experiment_dir=str(tmp_path / "experiment"),
        volumes=[{"raw": raw, "labels": labels, "roi": {"offset": [0, 0, 0], "shape": [40, 520, 696]}}],
        network={"name": "residual_unet", "dims": 2, "widths": [4, 6, 8], "crop": [0, 8, 8],
                 "downsample_factors": [[1, 2, 2], [1, 2, 2]]},
        method=PEA_2D,
        offsets=OFFSETS_2D,
        output_shape=[1, 64, 64],
        iterations=3,
        augment={**FULL_AUGMENT, "elastic": {"control_point_spacing": [1, 20, 20], "jitter_sigma": [0, 2, 2]}, "defects": None},
        precache_workers=2,
        save_every=2,
        snapshot_every=2,
        device="cpu",
    )
    training = Training(config, "cpu")
    assert training.run(config.iterations) == 0
    experiment = tmp_path / "experiment"
    assert (experiment / "model_checkpoint_2").exists()
    snapshot = zarr.open(str(next((experiment / "snapshots").iterdir())), "r")
    assert snapshot["prediction"].shape[1:] == (len(OFFSETS_2D), 1, 64, 64)
    model = load_model(training.export())
    assert model.method.name == "embedding" and set(model.outputs(model.offsets)) == {"embedding", "foreground"}


def test_pea_with_an_embedding_pyramid_trains_a_3d_residual_unet(tmp_path, labels):
    config = fib25_config(
        tmp_path, labels, network=BACKBONES["residual_unet"], method={"name": "embedding", "dim": 4},
        output_shape=[16, 16, 16], precache_workers=0, snapshot_every=0, iterations=2,
    )
    training = Training(config, "cpu")
    assert len(training.network.pyramid) == 2
    assert training.run(2) == 0
    assert load_model(training.export()).level_ranges == (1, 1)


def direct_affinities(labels: np.ndarray, offsets, grow: int) -> np.ndarray:
    """The methods notes' definition on labels that extend `grow` voxels
    beyond the affinities on each side: a_o(i) = 1 iff i and i + o carry the
    same non-zero label."""
    inner = tuple(slice(g, s - g) for g, s in zip(grow, labels.shape))
    here = labels[inner]
    out = []
    for o in offsets:
        there = labels[tuple(slice(g + d, s - g + d) for g, d, s in zip(grow, o, labels.shape))]
        out.append((here == there) & (here != 0))
    return np.stack(out).astype(np.float32)


def test_pipeline_affinity_targets_equal_the_definition(tmp_path, labels):
    config = fib25_config(tmp_path, labels, augment={"defects": None}, precache_workers=0)
    keys = TrainingKeys()
    vs = Coordinate(10, 10, 10)
    output = Coordinate(12, 12, 12)
    grow = Coordinate(np.abs(np.array(config.offsets)).max(axis=0))
    pipeline = training_pipeline(config, keys, vs)
    request = training_request(keys, output + grow * 2, output, vs)
    request[keys.labels].roi = request[keys.affs].roi.grow(grow * vs, grow * vs)
    checked = 0
    with gp.build(pipeline):
        for seed in range(4):
            request._random_seed = seed
            batch = pipeline.request_batch(request)
            expected = direct_affinities(batch[keys.labels].data[0], config.offsets, tuple(grow))
            target = batch[keys.affs].data[0]
            assert target.shape == expected.shape
            np.testing.assert_array_equal(target, expected)
            checked += int(expected.sum() > 0) * int((expected == 0).sum() > 0)
    assert checked >= 2  # batches with both classes in them, not trivially equal


def _masked_volume(tmp_path, name: str, data: np.ndarray):
    return prepare_volume(tmp_path / "sparse.zarr", name, open_ds(str(RAW)).roi, Coordinate(10, 10, 10), data.dtype.name,
                          Coordinate(64, 64, 64) * 10)


def test_sparse_labels_mask_the_loss(tmp_path, labels):
    dense = open_ds(labels)[open_ds(labels).roi]
    ids, sizes = np.unique(dense[dense > 0], return_counts=True)
    annotated = ids[np.argsort(sizes)[-6:]]  # six large instances
    mask = np.isin(dense, annotated).astype(np.uint8)
    # relabel every instance outside the annotation as a whole, many of them
    # with an annotated instance's id: those now continue an annotated
    # instance across its border, and must still count as unknown
    rng = np.random.default_rng(0)
    new_ids = np.where(rng.random(len(ids)) < 0.5, rng.choice(annotated, size=len(ids)), ids + 10**6)
    relabelled = np.where(dense > 0, new_ids[np.searchsorted(ids, dense)], 0)
    changed = np.where(mask == 1, dense, relabelled).astype(dense.dtype)
    volumes = {}
    for name, data in (("mask", mask), ("labels", dense), ("changed", changed)):
        _masked_volume(tmp_path, name, data)[open_ds(str(RAW)).roi] = data
        volumes[name] = str(tmp_path / "sparse.zarr" / name)

    def losses(labels_path: str, labels_mask: str | None) -> list[float]:
        volume = {"raw": str(RAW), "labels": labels_path, "labels_mask": labels_mask}
        config = fib25_config(tmp_path, labels, volumes=[volume], precache_workers=0, min_annotated=0.2)
        keys = TrainingKeys()
        vs = Coordinate(10, 10, 10)
        pipeline = training_pipeline(config, keys, vs)
        request = training_request(keys, Coordinate(20, 20, 20), Coordinate(20, 20, 20), vs)
        loss = WeightedMSELoss()
        values = []
        with gp.build(pipeline):
            for seed in range(3):
                request._random_seed = seed
                batch = pipeline.request_batch(request)
                target = torch.as_tensor(batch[keys.affs].data)
                prediction = torch.as_tensor(np.random.default_rng(seed).random(target.shape, dtype=np.float32))
                values.append(float(loss(prediction, target, torch.as_tensor(batch[keys.affs_mask].data))))
                assert batch[keys.affs_mask].data.mean() > 0.05
        return values

    assert losses(volumes["labels"], volumes["mask"]) == losses(volumes["changed"], volumes["mask"])
    # the same change is visible without the mask: the test can fail
    assert losses(volumes["labels"], None) != losses(volumes["changed"], None)


def test_training_resumes_at_the_checkpoint_with_its_optimiser_state(tmp_path, labels):
    first = Training(fib25_config(tmp_path, labels, iterations=2, precache_workers=0, snapshot_every=0), "cpu")
    assert first.run(2) == 0
    stopped = first.optimizer.state_dict()
    second = Training(fib25_config(tmp_path, labels, iterations=4, precache_workers=0, snapshot_every=0), "cpu")
    assert second.iteration == 2
    resumed = second.optimizer.state_dict()
    assert resumed["state"].keys() == stopped["state"].keys() and stopped["state"]
    for k, state in stopped["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["state"][k][name]), torch.as_tensor(value)), name
    weights = {k: v.clone() for k, v in second.network.state_dict().items()}
    for k, v in first.network.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert second.run(4) == 2
    assert (tmp_path / "experiment" / "model_checkpoint_4").exists()


def test_init_from_starts_a_new_experiment_from_an_exported_model(tmp_path, labels):
    source = Training(fib25_config(tmp_path / "a", labels, iterations=2, precache_workers=0, snapshot_every=0), "cpu")
    source.run(2)
    exported = source.export()
    fresh = fib25_config(tmp_path / "b", labels, iterations=3, precache_workers=0, snapshot_every=0)
    tuned = Training(fresh, "cpu", init_from=exported)
    assert tuned.iteration == 0
    weights = {k: v.clone() for k, v in tuned.network.state_dict().items()}
    for k, v in source.network.state_dict().items():
        assert torch.equal(weights[k], v), k
    # a network or offsets other than the model's is refused in one line
    with pytest.raises(UserError, match="not the config's network"):
        Training(fib25_config(tmp_path / "c", labels, network=BACKBONES["residual_unet"]), "cpu", init_from=exported)
    with pytest.raises(UserError, match="offsets"):
        Training(fib25_config(tmp_path / "d", labels, offsets=OFFSETS_3D[:5]), "cpu", init_from=exported)


def _artifact_volume(tmp_path, name: str, value: int, voxel_size: int = 10) -> str:
    roi = Roi((0, 0, 0), (4, 100, 100)) * voxel_size
    array = prepare_volume(tmp_path / "artifacts.zarr", name, roi, Coordinate((voxel_size,) * 3), "uint8", roi.shape)
    array[roi] = np.full((4, 100, 100), value, dtype=np.uint8)
    return str(tmp_path / "artifacts.zarr" / name)


@pytest.mark.parametrize("alpha", [255, 0])
def test_artifact_sections_are_blended_in_by_their_alpha(tmp_path, labels, alpha):
    artifacts = {"raw": _artifact_volume(tmp_path, "raw", 77), "alpha": _artifact_volume(tmp_path, "alpha", alpha), "probability": 1.0}
    config = fib25_config(tmp_path, labels, augment={**NO_AUGMENT, "defects": {"prob_missing": 0, "prob_low_contrast": 0, "artifacts": artifacts}})
    keys = TrainingKeys()
    voxel_size = Coordinate(10, 10, 10)
    request = training_request(keys, Coordinate(20, 40, 40), Coordinate(12, 12, 12), voxel_size)
    pipeline = training_pipeline(config, keys, voxel_size)
    with gp.build(pipeline):
        raw = pipeline.request_batch(request)[keys.raw].data
    if alpha == 255:  # opaque: every section is the artifact
        assert np.allclose(raw, 77 / 255)
    else:  # transparent: the EM stays
        assert raw.std() > 0.05


def test_artifacts_of_another_voxel_size_are_refused(tmp_path, labels):
    artifacts = {"raw": _artifact_volume(tmp_path, "raw", 77, 20), "alpha": _artifact_volume(tmp_path, "alpha", 255, 20)}
    config = fib25_config(tmp_path, labels, augment={**NO_AUGMENT, "defects": {"artifacts": artifacts}})
    with pytest.raises(UserError, match="voxel size"):
        training_pipeline(config, TrainingKeys(), Coordinate(10, 10, 10))
