"""Train a network of one method (affinity, embedding, crac) on gunpowder batches.

    python pipeline/train.py CONFIG [--device auto|cpu|cuda] [--init-from MODEL]

The batches come from `pipeline.training.gunpowder_pipeline` (augmentations,
sparse annotation masks, affinity targets); the config's `method` gives the
heads and the loss terms (`pipeline/methods/`); affseg's loop
(`pipeline.training.loop`) optimises them. Under EXPERIMENT_DIR:

- `model_checkpoint_N` every `save_every` iterations and at the end (the
  training step's state, optimiser, iteration, RNG states); a second run of
  the same command resumes from the latest one (raise `iterations` to train
  on);
- `tensorboard/`: each loss term, the total, learning rate and
  iterations/s every `log_every`;
- `snapshots/N.zarr`: raw, labels, annotation mask, target and the method's
  predictions every `snapshot_every` iterations, for inspection;
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

if __package__ in (None, ""):  # run as `python pipeline/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import cli_main
from pipeline.config import load_json
from pipeline.orchestration.devices import choose_device
from pipeline.training.config import TrainConfig


def train(config: TrainConfig, device: str, init_from: Path | None = None) -> Path:
    # imported here, after the config is checked: the loop brings gunpowder
    # (2 s of imports), and a bad config is refused without waiting for it
    from pipeline.training.loop import Training

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
