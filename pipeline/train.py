"""Train a network of one method (affinity, embedding) with gunpowder.

    python pipeline/train.py CONFIG [--device auto|cpu|cuda] [--init-from MODEL]

The batches come from `pipeline.training.gunpowder_pipeline` (augmentations,
sparse annotation masks, affinity targets); the config's `method` gives the
heads and the loss (`pipeline/methods/`); this module adds the torch node,
the loop and its outputs, all under EXPERIMENT_DIR:

- `model_checkpoint_N` every `save_every` iterations (weights and optimiser
  state); a second run of the same command resumes from the latest one;
- `tensorboard/`: loss, learning rate and iterations/s every `log_every`;
- `snapshots/N.zarr`: raw, labels, target and prediction every
  `snapshot_every` iterations, for inspection;
- `model.pt` at the end: the network alone, the file the `model.checkpoint`
  key of a predict config points at.

`--init-from MODEL` starts a new experiment from the weights of an exported
model of the same network and offsets (fine-tuning, e.g. on new data or with
more augmentation); the optimiser starts fresh. Once the experiment has a
checkpoint, resuming from it wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python pipeline/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dask
import gunpowder as gp
import torch
from funlib.geometry import Coordinate
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.cli import cli_main
from pipeline.config import load_json
from pipeline.training.config import TrainConfig
from pipeline.errors import UserError
from pipeline.methods import build_model, load_model, save_model, training_step
from pipeline.orchestration.devices import choose_device
from pipeline.training.gunpowder_pipeline import TrainingKeys, training_pipeline, training_request, volume_voxel_size


class Autocast(torch.nn.Module):
    """The method's training step under bfloat16 autocast on CUDA when
    enabled, float32 outputs either way. Always wrapped, so checkpoints have
    the same keys on every device and a run can resume on another one."""

    def __init__(self, step: torch.nn.Module, enabled: bool):
        super().__init__()
        self.step = step
        self.enabled = enabled

    def forward(self, raw: torch.Tensor, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.enabled and raw.is_cuda):
            return tuple(t.float() for t in self.step(raw, **batch))


class TakeLoss(torch.nn.Module):
    """gunpowder's Train wants a loss function; the training step already
    computed the loss (a method's loss needs the model, e.g. for CCM's
    second view), so this one hands it on."""

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def check_shapes(model, input_shape: Coordinate, output_shape: Coordinate) -> None:
    """One forward pass on zeros: the network must turn the input the
    pipeline will request into exactly the output the targets will have."""
    with torch.no_grad():
        was_training = model.training
        out = model.affinities(model.eval()(torch.zeros((1, model.in_channels, *input_shape))), model.offsets)
        model.train(was_training)
    if tuple(out.shape[2:]) != tuple(output_shape):
        raise UserError(
            f"network: input {tuple(input_shape)} gives output {tuple(out.shape[2:])} voxels, but the "
            f"targets are {tuple(output_shape)}; the backbone's geometry is wrong"
        )


def latest_checkpoint(experiment: Path) -> tuple[int, Path] | None:
    """(iteration, path) of gunpowder's latest `model_checkpoint_N`, the
    one its Train node resumes from."""
    found = []
    for path in experiment.glob("model_checkpoint_*"):
        suffix = path.name.rsplit("_", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found) if found else None


def check_resumable(experiment: Path, model: torch.nn.Module, iterations: int) -> None:
    """Refuse, in one line, a resume that gunpowder would turn into a torch
    size-mismatch traceback (the network or offsets changed since the
    checkpoint) or into "iterations 2..1" (fewer iterations than done)."""
    latest = latest_checkpoint(experiment)
    if latest is None:
        return
    done, path = latest
    if done > iterations:
        raise UserError(f"iterations: {experiment} holds a checkpoint at iteration {done}, beyond iterations {iterations}; "
                        f"raise iterations to train on, or use another experiment_dir")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise UserError(f"experiment_dir: {path} cannot be read ({type(e).__name__}); delete it to resume from an earlier one") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved.items()}
    if found != expected:
        differs = next((k for k in expected if found.get(k) != expected[k]), None) or next(k for k in found if k not in expected)
        raise UserError(
            f"experiment_dir: {path.name} was trained with another network or offsets than this config "
            f"({differs.removeprefix(_CHECKPOINT_PREFIX)}: {found.get(differs)} there, {expected.get(differs)} here); "
            f"use a new experiment_dir, or --init-from its model.pt where the network is the same"
        )


class Training:
    """The network, the full pipeline and the gunpowder torch node of one
    experiment. `run(iterations)` trains to that iteration, resuming from the
    latest checkpoint."""

    def __init__(self, config: TrainConfig, device: str, init_from: Path | None = None):
        self.config, self.device = config, device
        # funlib.persistence reads through dask, whose default thread pool
        # does not survive PreCache's fork: a child that inherits a pool the
        # parent already started (RandomLocation reads the whole annotation
        # mask up front) waits forever on threads it does not have. Batch
        # reads are small; PreCache's processes are the parallelism.
        dask.config.set(scheduler="synchronous")
        self.experiment = Path(config.experiment_dir)
        self.experiment.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.spec = config.network.model_dump()
        try:
            self.network = build_model(config.method, self.spec, config.offsets)
        except ValueError as e:
            raise UserError(str(e)) from e
        if init_from is not None:
            # gunpowder's Train restores the latest checkpoint at build, after
            # this, so a resumed fine-tuning continues from its own state
            self._initialise(Path(init_from))
        geometry = self.network.geometry
        try:
            self.output_shape = Coordinate(geometry.valid_output_shape(config.output_shape))
        except ValueError as e:
            raise UserError(f"network: {e}") from e
        self.input_shape = Coordinate(geometry.input_shape(self.output_shape))
        check_shapes(self.network, self.input_shape, self.output_shape)
        self.keys = TrainingKeys()
        voxel_size = volume_voxel_size(config)
        self.request = training_request(self.keys, self.input_shape, self.output_shape, voxel_size)
        self.request.add(self.keys.prediction, self.output_shape * voxel_size)

        pipeline = training_pipeline(config, self.keys, voxel_size)
        if config.precache_workers:
            pipeline += gp.PreCache(cache_size=2 * config.precache_workers, num_workers=config.precache_workers)
        model = Autocast(training_step(self.network, config.method), config.mixed_precision)
        check_resumable(self.experiment, model, config.iterations)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        k = self.keys
        self.trainer = gp.torch.Train(
            model,
            TakeLoss(),
            self.optimizer,
            inputs={"raw": k.raw, "labels": k.labels, "labels_mask": k.labels_mask, "affs": k.affs, "affs_mask": k.affs_mask},
            outputs={0: k.prediction, 1: k.loss},
            loss_inputs={0: k.loss},
            checkpoint_basename=str(self.experiment / "model"),
            save_every=config.save_every,
            device=device,
        )
        pipeline += self.trainer
        if config.snapshot_every:
            pipeline += gp.Snapshot(
                {self.keys.raw: "raw", self.keys.labels: "labels", self.keys.affs: "target",
                 self.keys.prediction: "prediction"},
                output_dir=str(self.experiment / "snapshots"),
                output_filename="{iteration}.zarr",
                every=config.snapshot_every,
            )
        self.pipeline = pipeline

    def _initialise(self, path: Path) -> None:
        try:
            source = load_model(path)
        except (OSError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from e
        if source.method != self.config.method:
            raise UserError(f"--init-from {path}: its method {source.method.model_dump()} differs from the config's")
        if source.offsets != self.network.offsets:
            raise UserError(f"--init-from {path}: its offsets {list(source.offsets)} differ from the config's")
        try:
            self.network.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise UserError(f"--init-from {path}: its network is not the config's network "
                            f"({str(e).splitlines()[0]})") from e

    def run(self, iterations: int) -> int:
        """Train up to `iterations`; returns the iteration it started from."""
        writer = SummaryWriter(str(self.experiment / "tensorboard"))
        with gp.build(self.pipeline):
            first = self.trainer.iteration
            last_time, last_iteration = time.time(), first
            with tqdm(total=iterations, initial=first, desc="train", unit="it") as bar:
                while self.trainer.iteration < iterations:
                    batch = self.pipeline.request_batch(self.request)
                    bar.update(1)
                    bar.set_postfix(loss=f"{batch.loss:.4f}")
                    iteration = self.trainer.iteration
                    if iteration % self.config.log_every == 0 or iteration == iterations:
                        now = time.time()
                        writer.add_scalar("loss", batch.loss, iteration)
                        writer.add_scalar("learning_rate", self.optimizer.param_groups[0]["lr"], iteration)
                        writer.add_scalar("iterations_per_second", (iteration - last_iteration) / max(now - last_time, 1e-9), iteration)
                        last_time, last_iteration = now, iteration
        writer.close()
        return first

    def export(self) -> Path:
        exported = self.experiment / "model.pt"
        state = {k: v.cpu() for k, v in self.network.state_dict().items()}
        save_model(exported, self.config.method, self.spec, self.config.offsets, state)
        return exported


# gunpowder checkpoints hold the state of Autocast(training step), whose
# `step.model` is the exported network
_CHECKPOINT_PREFIX = "step.model."


def export_checkpoint(config: TrainConfig, checkpoint: Path, exported: Path) -> Path:
    """The network of one `model_checkpoint_N` as a model file, e.g. to
    score a training run's checkpoints (benchmarks/training_curve.py)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model_state_dict"]
    network = {k.removeprefix(_CHECKPOINT_PREFIX): v for k, v in state.items() if k.startswith(_CHECKPOINT_PREFIX)}
    save_model(exported, config.method, config.network.model_dump(), config.offsets, network)
    return exported


def train(config: TrainConfig, device: str, init_from: Path | None = None) -> Path:
    training = Training(config, device, init_from)
    started = time.time()
    first = training.run(config.iterations)
    exported = training.export()
    done = f"trained iterations {first}..{config.iterations}" if first < config.iterations else f"already trained to iteration {first}"
    print(
        f"{done} in {time.time() - started:.0f} s on {device}; "
        f"input {tuple(training.input_shape)} -> output {tuple(training.output_shape)} voxels; exported {exported}"
    )
    return exported


def main() -> None:
    parser = argparse.ArgumentParser(prog="python pipeline/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config JSON (see configs/train_fib25.json)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides the config's device")
    parser.add_argument("--init-from", type=Path, metavar="MODEL",
                        help="start a new experiment from this exported model.pt's weights (same network and offsets)")
    args = parser.parse_args()
    config = TrainConfig(**load_json(args.config))
    logging.getLogger("gunpowder").setLevel(logging.WARNING)
    train(config, choose_device(args.device or config.device), args.init_from)


if __name__ == "__main__":
    cli_main(main)
