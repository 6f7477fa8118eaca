"""affseg's training loop: gunpowder assembles the batches (augmentation,
targets, PreCache), this loop does the optimisation.

Each iteration: a batch from the pipeline, the method's training step
(`pipeline.methods.base.MethodStep`) with the iteration and the planned
total, the sum of its named loss terms backpropagated, one optimiser step
at the schedule's learning rate, then the step's `after_update` (an EMA
teacher follows there). Under EXPERIMENT_DIR:

- `model_checkpoint_N` every `save_every` iterations and at the last one
  (`pipeline.training.checkpoints`: step state, optimiser, RNG states); a
  second run of the same command resumes from the latest one, and gives
  the same losses as a run that never stopped (with `precache_workers: 0`,
  whose batches are seeded by the iteration);
- `tensorboard/`: every loss term, their total, the step's metrics, the
  learning rate and iterations/s every `log_every`;
- `snapshots/N.zarr`: raw, labels, annotation mask, target and every
  prediction the step names, every `snapshot_every` iterations;
- `model.pt` (`export()`): the network alone, the file the
  `model.checkpoint` key of a predict config points at.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask
import gunpowder as gp
import numpy as np
import torch
import zarr
from funlib.geometry import Coordinate
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.methods import build_model, load_model, save_model, training_step
from pipeline.methods.base import Progress, StepOutput, TrainingBatch
from pipeline.training.checkpoints import (
    check_resumable, latest_checkpoint, network_state, read_checkpoint, restore_rng, save_checkpoint,
)
from pipeline.training.config import TrainConfig
from pipeline.training.gunpowder_pipeline import TrainingKeys, training_pipeline, training_request, volume_voxel_size
from pipeline.training.optimiser import apply_config, build_optimizer, learning_rate


def check_shapes(model, input_shape: Coordinate, output_shape: Coordinate) -> None:
    """One forward pass on zeros: the network must turn the input the
    pipeline will request into exactly the output the targets will have."""
    with torch.no_grad():
        was_training = model.training
        out = model.predict(model.eval()(torch.zeros((1, model.in_channels, *input_shape))), model.offsets)["affs"]
        model.train(was_training)
    if tuple(out.shape[2:]) != tuple(output_shape):
        raise UserError(
            f"network: input {tuple(input_shape)} gives output {tuple(out.shape[2:])} voxels, but the "
            f"targets are {tuple(output_shape)}; the backbone's geometry is wrong"
        )


def user_error_of(error: Exception) -> UserError | None:
    """The UserError a pipeline node raised, or None. PreCache's workers
    hand the main process only the formatted traceback of an exception
    (the type is lost with the process), so it is found by its last line."""
    while error is not None:
        text = str(error).rstrip()
        marker = f"{UserError.__module__}.{UserError.__qualname__}: "
        if marker in text:
            return UserError(text[text.rindex(marker) + len(marker):].splitlines()[0])
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def batch_seed(seed: int, iteration: int) -> int:
    """The gunpowder seed of iteration's batch: a function of the config's
    seed and the iteration, so a resumed run draws the batches it would
    have drawn."""
    return (seed * 1_000_003 + iteration * 7_919 + 1) % 2**32


class Training:
    """The network, its training step, the optimiser and the batch pipeline
    of one experiment, resumed from its latest checkpoint. `run(iterations)`
    trains to that iteration."""

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
            self._initialise(Path(init_from))
        geometry = self.network.geometry
        try:
            self.output_shape = Coordinate(geometry.valid_output_shape(config.output_shape))
        except ValueError as e:
            raise UserError(f"network: {e}") from e
        self.input_shape = Coordinate(geometry.input_shape(self.output_shape))
        check_shapes(self.network, self.input_shape, self.output_shape)
        self.keys = TrainingKeys()
        self.voxel_size = volume_voxel_size(config)
        self.request = training_request(self.keys, self.input_shape, self.output_shape, self.voxel_size)
        self.pipeline = training_pipeline(config, self.keys, self.voxel_size)
        if config.precache_workers:
            self.pipeline += gp.PreCache(cache_size=2 * config.precache_workers, num_workers=config.precache_workers)

        self.step = training_step(self.network, config.method)
        self.optimizer = build_optimizer(config.optimizer, self.step.trainable())
        self.iteration = 0
        latest = latest_checkpoint(self.experiment)
        if latest is not None:  # resuming wins over --init-from
            self._resume(latest[1])
        self.step.to(device)
        # the losses of each iteration this object trained, {term: value}
        self.history: list[dict[str, float]] = []

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

    def _resume(self, path: Path) -> None:
        checkpoint = read_checkpoint(path)
        check_resumable(checkpoint, path, self.step, self.config.iterations, self.config.method.model_dump(mode="json"))
        self.step.load_state_dict(checkpoint.step)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        apply_config(self.optimizer, self.config.optimizer)
        if checkpoint.rng is not None:
            restore_rng(checkpoint.rng)
        self.iteration = checkpoint.iteration

    def _batch(self) -> tuple[gp.Batch, TrainingBatch]:
        if not self.config.precache_workers:
            # PreCache's workers share one request, so a seeded one would
            # give them all the same batch: seeds only without it
            self.request._random_seed = batch_seed(self.config.seed, self.iteration)
        try:
            batch = self.pipeline.request_batch(self.request)
        except gp.PipelineRequestError as e:
            raise user_error_of(e) or e
        k = self.keys

        def tensor(key, dtype=torch.float32):
            return torch.as_tensor(batch[key].data).to(self.device, dtype)

        return batch, TrainingBatch(tensor(k.raw), tensor(k.labels, torch.int64), tensor(k.labels_mask),
                                    tensor(k.affs), tensor(k.affs_mask))

    def _update(self, batch: TrainingBatch, progress: Progress) -> tuple[StepOutput, dict[str, float]]:
        rate = learning_rate(progress.iteration, self.config.optimizer.learning_rate, self.config.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.step.train()
        self.optimizer.zero_grad(set_to_none=True)
        mixed = self.config.mixed_precision and self.device.startswith("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            output = self.step(batch, progress)
        losses = {name: value.float() for name, value in output.losses.items()}
        total = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(total):
            # an optimiser step on it would turn every weight into NaN, and
            # the next checkpoint would keep them
            terms = ", ".join(f"{name} {float(value.detach()):g}" for name, value in losses.items())
            raise UserError(f"training: the loss is not finite at iteration {progress.iteration} ({terms}); the "
                            f"checkpoints so far are untouched: lower optimizer.learning_rate and run again")
        total.backward()
        self.optimizer.step()
        self.step.after_update(progress)
        return output, {"loss": float(total.detach()), **{name: float(value.detach()) for name, value in losses.items()}}

    def run(self, iterations: int) -> int:
        """Train up to `iterations`; returns the iteration it started from."""
        c = self.config
        first = self.iteration
        writer = SummaryWriter(str(self.experiment / "tensorboard"))
        last_time, last_iteration = time.time(), first
        with gp.build(self.pipeline), tqdm(total=iterations, initial=first, desc="train", unit="it") as bar:
            while self.iteration < iterations:
                batch, tensors = self._batch()
                output, losses = self._update(tensors, Progress(self.iteration, iterations))
                self.iteration += 1
                self.history.append(losses)
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                done = self.iteration == iterations
                if self.iteration % c.log_every == 0 or done:
                    now = time.time()
                    for name, value in losses.items():
                        writer.add_scalar("loss" if name == "loss" else f"loss/{name}", value, self.iteration)
                    for name, value in output.metrics.items():
                        writer.add_scalar(f"metrics/{name}", value, self.iteration)
                    writer.add_scalar("learning_rate", self.optimizer.param_groups[0]["lr"], self.iteration)
                    writer.add_scalar("iterations_per_second", (self.iteration - last_iteration) / max(now - last_time, 1e-9),
                                      self.iteration)
                    last_time, last_iteration = now, self.iteration
                if c.snapshot_every and self.iteration % c.snapshot_every == 0:
                    self._snapshot(batch, output)
                if self.iteration % c.save_every == 0 or done:
                    save_checkpoint(self.experiment, self.iteration, self.step, self.optimizer,
                                    c.method.model_dump(mode="json"))
        writer.close()
        return first

    def _snapshot(self, batch: gp.Batch, output: StepOutput) -> None:
        """raw, labels, mask, target and the step's predictions, with the
        offset and voxel size gunpowder's Snapshot node wrote (batch axis first)."""
        k = self.keys
        group = zarr.open_group(str(self.experiment / "snapshots" / f"{self.iteration}.zarr"), mode="w")
        arrays = {"raw": batch[k.raw], "labels": batch[k.labels], "labels_mask": batch[k.labels_mask],
                  "target": batch[k.affs]}
        output_roi = batch[k.affs].spec.roi
        for name, array in arrays.items():
            group.array(name, array.data)
            group[name].attrs.update(offset=list(array.spec.roi.offset), resolution=list(self.voxel_size))
        for name, value in output.snapshot.items():
            group.array(name, value.detach().float().cpu().numpy())
            group[name].attrs.update(offset=list(output_roi.offset), resolution=list(self.voxel_size))

    def export(self) -> Path:
        exported = self.experiment / "model.pt"
        state = {k: v.cpu() for k, v in self.network.state_dict().items()}
        save_model(exported, self.config.method, self.spec, self.config.offsets, state)
        return exported


def export_checkpoint(config: TrainConfig, checkpoint: Path, exported: Path) -> Path:
    """The network of one `model_checkpoint_N` as a model file, e.g. to
    score a training run's checkpoints (benchmarks/training_curve.py)."""
    save_model(exported, config.method, config.network.model_dump(), config.offsets, network_state(read_checkpoint(checkpoint)))
    return exported
