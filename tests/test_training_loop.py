"""affseg's training loop: named loss terms, exact resume, the optimiser
and schedule settings, batches of several samples, gunpowder-era
checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.errors import UserError
from pipeline.training.checkpoints import checkpoint_path, read_checkpoint
from pipeline.training.config import OptimizerConfig, ScheduleConfig, TrainConfig
from pipeline.training.loop import Training
from pipeline.training.optimiser import learning_rate
from tests.conftest import assert_one_line_error, run_cli

OFFSETS_2D = [[0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3]]
BACKBONE = {"name": "residual_unet", "dims": 2, "widths": [4, 6, 8], "crop": [0, 8, 8],
            "downsample_factors": [[1, 2, 2], [1, 2, 2]]}
PEA = {"name": "embedding", "dim": 4, "epm": {"ranges": [3, 1]}, "foreground": {}}


def nuclei_config(tmp_path, nuclei, **overrides) -> TrainConfig:
    raw, labels = nuclei
    config = {
        "experiment_dir": str(tmp_path / "experiment"),
        "volumes": [{"raw": raw, "labels": labels, "roi": {"offset": [0, 0, 0], "shape": [40, 520, 696]}}],
        "network": BACKBONE,
        "method": PEA,
        "offsets": OFFSETS_2D,
        "output_shape": [1, 32, 32],
        "iterations": 4,
        "augment": {"elastic": None, "defects": None},
        "precache_workers": 0,
        "save_every": 2,
        "snapshot_every": 0,
        "log_every": 1,
        "device": "cpu",
    }
    config.update(overrides)
    return TrainConfig(**config)


def test_resumed_training_gives_the_losses_of_an_uninterrupted_run(tmp_path, nuclei):
    """PEA's CCM view is drawn from torch's generator and the batches from
    gunpowder's: a resume restores both, the weights and Adam's moments."""
    through = Training(nuclei_config(tmp_path / "through", nuclei), "cpu")
    through.run(4)
    stopped = Training(nuclei_config(tmp_path / "stopped", nuclei, iterations=2), "cpu")
    stopped.run(2)
    resumed = Training(nuclei_config(tmp_path / "stopped", nuclei), "cpu")
    assert resumed.iteration == 2
    resumed.run(4)
    assert [h["loss"] for h in stopped.history + resumed.history] == [h["loss"] for h in through.history]
    assert len({h["loss"] for h in through.history}) == 4  # the losses move: the comparison says something
    for name, value in through.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[name], value), name


def test_every_loss_term_is_named_logged_and_summed(tmp_path, nuclei):
    training = Training(nuclei_config(tmp_path, nuclei, iterations=2), "cpu")
    training.run(2)
    terms = {"scm", "ccm", "epm_1", "epm_2", "foreground"}
    for entry in training.history:
        assert set(entry) == terms | {"loss"}
        assert math.isclose(entry["loss"], sum(entry[t] for t in terms), rel_tol=1e-5)
    events = EventAccumulator(str(tmp_path / "experiment" / "tensorboard")).Reload()
    assert {"loss", "learning_rate", *(f"loss/{t}" for t in terms)} <= set(events.Tags()["scalars"])


def test_batches_hold_batch_size_samples(tmp_path, nuclei):
    training = Training(nuclei_config(tmp_path, nuclei, batch_size=3, iterations=1), "cpu")
    with __import__("gunpowder").build(training.pipeline):
        _, batch = training._batch()
    assert batch.raw.shape == (3, 1, 1, *training.input_shape[1:]) and batch.affs.shape[0] == 3
    assert not torch.equal(batch.raw[0], batch.raw[1])
    training.run(1)


def test_the_pea_optimiser_of_the_methods_notes_is_expressible(tmp_path, nuclei):
    pea = {"name": "adam", "learning_rate": 1e-4, "betas": [0.9, 0.999], "eps": 0.01, "weight_decay": 1e-6, "amsgrad": True}
    training = Training(nuclei_config(tmp_path, nuclei, optimizer=pea), "cpu")
    group = training.optimizer.param_groups[0]
    assert type(training.optimizer) is torch.optim.Adam
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (1e-4, (0.9, 0.999), 0.01, 1e-6, True)
    adamw = Training(nuclei_config(tmp_path / "w", nuclei, optimizer={"name": "adamw", "weight_decay": 0.05}), "cpu")
    assert type(adamw.optimizer) is torch.optim.AdamW and adamw.optimizer.param_groups[0]["weight_decay"] == 0.05


def test_a_resume_takes_the_configs_optimiser_settings(tmp_path, nuclei):
    Training(nuclei_config(tmp_path, nuclei, iterations=2), "cpu").run(2)
    changed = Training(nuclei_config(tmp_path, nuclei, optimizer={"learning_rate": 3e-3, "eps": 1e-3}), "cpu")
    assert changed.iteration == 2
    assert (changed.optimizer.param_groups[0]["lr"], changed.optimizer.param_groups[0]["eps"]) == (3e-3, 1e-3)


def test_a_resume_under_other_method_settings_is_refused(tmp_path, nuclei):
    """The weights' settings must stay those the exported model records."""
    Training(nuclei_config(tmp_path, nuclei, iterations=2), "cpu").run(2)
    with pytest.raises(UserError, match="method.clamp_negative: model_checkpoint_2 was trained with true, this config gives false"):
        Training(nuclei_config(tmp_path, nuclei, method={**PEA, "clamp_negative": False}), "cpu")
    assert Training(nuclei_config(tmp_path, nuclei), "cpu").iteration == 2


def test_the_learning_rate_schedule():
    cosine = ScheduleConfig(warmup=10, decay="cosine", until=110, final=0.1)
    assert learning_rate(0, 1.0, cosine) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, cosine) == pytest.approx(1.0)
    assert learning_rate(10, 1.0, cosine) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, cosine) == pytest.approx(0.55)
    assert learning_rate(110, 1.0, cosine) == pytest.approx(0.1)
    assert learning_rate(10**6, 1.0, cosine) == pytest.approx(0.1)
    linear = ScheduleConfig(decay="linear", until=100)
    assert learning_rate(25, 2.0, linear) == pytest.approx(1.5)
    assert learning_rate(7, 2.0, None) == 2.0
    assert learning_rate(7, 2.0, ScheduleConfig(decay="constant", warmup=4)) == 2.0


def test_the_schedule_sets_the_rate_of_each_step(tmp_path, nuclei):
    training = Training(nuclei_config(tmp_path, nuclei, iterations=4, optimizer={"learning_rate": 1e-2},
                                      lr_schedule={"warmup": 2, "decay": "linear", "until": 4}), "cpu")
    training.run(4)
    events = EventAccumulator(str(tmp_path / "experiment" / "tensorboard")).Reload()
    assert [round(e.value, 6) for e in events.Scalars("learning_rate")] == [0.005, 0.01, 0.01, 0.005]


def test_a_gunpowder_checkpoint_resumes(tmp_path, nuclei):
    """Experiments begun under gunpowder's Train node: its file held the
    step's state under `step.` and the optimiser, no RNG state."""
    first = Training(nuclei_config(tmp_path, nuclei, iterations=2), "cpu")
    first.run(2)
    path = checkpoint_path(tmp_path / "experiment", 2)
    saved = read_checkpoint(path)
    torch.save({"model_state_dict": {f"step.{k}": v for k, v in saved.step.items()},
                "optimizer_state_dict": saved.optimizer}, path)
    resumed = Training(nuclei_config(tmp_path, nuclei), "cpu")
    assert resumed.iteration == 2
    for name, value in first.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[name], value), name
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 2
    resumed.run(4)


def test_a_loss_that_is_not_finite_stops_training_before_the_weights_change(tmp_path, nuclei):
    training = Training(nuclei_config(tmp_path, nuclei, iterations=3), "cpu")
    training.run(2)
    # the weights (BatchNorm's running statistics move with any forward pass)
    weights = {k: v.detach().clone() for k, v in training.network.named_parameters()}
    forward = training.step.forward

    def diverged(batch, progress):
        output = forward(batch, progress)
        output.losses["scm"] = output.losses["scm"] * float("nan")
        return output

    training.step.forward = diverged
    with pytest.raises(UserError, match="the loss is not finite at iteration 2 .*scm nan"):
        training.run(3)
    for name, value in training.network.named_parameters():
        assert torch.equal(value, weights[name]), name
    assert read_checkpoint(checkpoint_path(tmp_path / "experiment", 2)).iteration == 2


def test_a_missing_chunk_of_a_training_volume_is_one_line(tmp_path, nuclei):
    import shutil

    raw, labels = nuclei
    copy = tmp_path / "copy.zarr"
    shutil.copytree(labels, copy / "labels")
    chunk = next(p for p in (copy / "labels").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.unlink()
    with pytest.raises(UserError, match="volumes.0.labels: chunk .* is missing"):
        Training(nuclei_config(tmp_path, nuclei, volumes=[{"raw": raw, "labels": str(copy / "labels")}]), "cpu")


def test_a_damaged_checkpoint_is_one_line(tmp_path, nuclei):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "model_checkpoint_2").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="model_checkpoint_2 cannot be read"):
        Training(nuclei_config(tmp_path, nuclei), "cpu")


def test_bad_optimiser_and_schedule_settings_are_one_line(tmp_path, nuclei):
    raw, labels = nuclei
    base = nuclei_config(tmp_path, nuclei).model_dump(mode="json")
    for change, message in (
        ({"learning_rate": 0.001}, "learning_rate is now optimizer.learning_rate"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas"),
        ({"lr_schedule": {"decay": "cosine"}}, "a cosine decay needs `until`"),
        ({"lr_schedule": {"warmup": 10, "until": 5}}, "must come after the warm-up"),
        ({"batch_size": 0}, "batch_size"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(__import__("json").dumps({**base, **change}))
        assert_one_line_error(run_cli("pipeline/train.py", str(path)), message)


def test_optimizer_defaults_are_torchs_adam():
    assert OptimizerConfig().model_dump() == {"name": "adam", "learning_rate": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                              "weight_decay": 0.0, "amsgrad": False}


def test_best_share_is_the_densest_box_of_the_mask():
    import numpy as np
    from skimage.transform import integral_image

    from pipeline.training.gunpowder_pipeline import best_share

    rng = np.random.default_rng(3)
    mask = rng.random((3, 12, 15)) < 0.3
    mask[1, 2:7, 3:9] = True  # one dense patch
    integral = integral_image(mask.astype(np.uint32))
    for window in ((1, 1, 1), (1, 5, 6), (2, 4, 7), (3, 12, 15), (1, 12, 2)):
        counts = [int(mask[z:z + window[0], y:y + window[1], x:x + window[2]].sum())
                  for z in range(3 - window[0] + 1) for y in range(12 - window[1] + 1) for x in range(15 - window[2] + 1)]
        assert best_share(integral, window) == max(counts) / math.prod(window), window
    assert best_share(integral, (4, 1, 1)) == 0.0  # no box that large fits


def test_a_min_annotated_no_location_reaches_is_one_line_not_a_hang(tmp_path, nuclei):
    """Sparse sampling draws locations until one holds `min_annotated` of
    annotated instance voxels; where none can, it drew forever (a training
    on 5% of the nuclei hung before its first batch). Here the densest
    64 x 64 box of the nuclei is 0.81 nuclei, and the batches come from a
    PreCache worker, whose error reaches the user as its one line."""
    raw, labels = nuclei
    config = nuclei_config(tmp_path, nuclei, output_shape=[1, 64, 64], min_annotated=0.9, precache_workers=1,
                           augment={"elastic": None, "defects": None, "intensity": None},
                           volumes=[{"raw": raw, "labels": labels, "sparse": True,
                                     "roi": {"offset": [0, 0, 0], "shape": [40, 520, 696]}}])
    path = tmp_path / "train.json"
    path.write_text(config.model_dump_json())
    result = run_cli("pipeline/train.py", str(path), timeout=300)
    # the error comes once the batches are asked for: under the progress bar
    *bar, error = result.stderr.strip().splitlines()
    assert result.returncode == 2 and all(line.startswith("train:") for line in bar), result.stderr[-3000:]
    assert error.startswith("affseg: error: min_annotated: no location of volumes.0 has 0.9 of its (1, 64, 64) voxels")
    # reachable: the same volume trains
    path.write_text(config.model_copy(update={"min_annotated": 0.5, "iterations": 2}).model_dump_json())
    result = run_cli("pipeline/train.py", str(path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
