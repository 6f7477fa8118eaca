"""Train an affinity network with gunpowder.

    python pipeline/train.py CONFIG [--device auto|cpu|cuda] [--init-from MODEL]

The batches come from `pipeline.train_pipeline` (augmentations, sparse
annotation masks, affinity targets); this module adds the torch node, the
loop and its outputs, all under EXPERIMENT_DIR:

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

from networks.losses import WeightedMSELoss
from networks.models import build_network, load_model, save_model
from pipeline.config import TrainConfig, load_json
from pipeline.devices import choose_device
from pipeline.cli import cli_main
from pipeline.errors import UserError
from pipeline.train_pipeline import TrainingKeys, training_pipeline, training_request, volume_voxel_size


class Autocast(torch.nn.Module):
    """The network under bfloat16 autocast on CUDA when enabled, float32
    outputs either way. Always wrapped, so checkpoints have the same keys on
    every device and a run can resume on another one."""

    def __init__(self, network: torch.nn.Module, enabled: bool):
        super().__init__()
        self.network = network
        self.enabled = enabled

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.enabled and raw.is_cuda):
            return self.network(raw).float()


def check_shapes(model: torch.nn.Module, input_shape: Coordinate, output_shape: Coordinate) -> None:
    """One forward pass on zeros: the network must turn the input the
    pipeline will request into exactly the output the targets will have."""
    with torch.no_grad():
        was_training = model.training
        out = model.eval()(torch.zeros((1, 1, *input_shape)))
        model.train(was_training)
    if tuple(out.shape[2:]) != tuple(output_shape):
        raise UserError(
            f"network: input {tuple(input_shape)} gives output {tuple(out.shape[2:])} voxels, but the "
            f"targets are {tuple(output_shape)}; the backbone's geometry is wrong"
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
        self.network = build_network(self.spec, config.offsets)
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
        model = Autocast(self.network, config.mixed_precision)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.trainer = gp.torch.Train(
            model,
            WeightedMSELoss(),
            self.optimizer,
            inputs={"raw": self.keys.raw},
            outputs={0: self.keys.prediction},
            loss_inputs={0: self.keys.prediction, 1: self.keys.affs, 2: self.keys.affs_mask},
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
        save_model(exported, self.spec, [list(o) for o in self.config.offsets], state)
        return exported


def train(config: TrainConfig, device: str, init_from: Path | None = None) -> Path:
    training = Training(config, device, init_from)
    started = time.time()
    first = training.run(config.iterations)
    exported = training.export()
    print(
        f"trained iterations {first}..{config.iterations} in {time.time() - started:.0f} s on {device}; "
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
