"""Train an affinity network with gunpowder.

    python pipeline/train.py CONFIG [--device cpu|cuda|auto]

Checkpoints go to EXPERIMENT_DIR/model_checkpoint_N every `save_every`
iterations; a second run of the same command resumes from the latest one.
At the end the network is exported to EXPERIMENT_DIR/model.pt, the file the
`model.checkpoint` key of a predict config points at.
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

import gunpowder as gp
import torch
from funlib.geometry import Coordinate, Roi
from tqdm import tqdm

from networks.losses import WeightedMSELoss
from networks.models import build_network, save_model
from pipeline.config import TrainConfig, load_json
from pipeline.devices import choose_device
from pipeline.cli import cli_main
from pipeline.errors import UserError
from pipeline.volumes import open_volume, split_path


def _volume_sources(config: TrainConfig, keys: dict[str, gp.ArrayKey]) -> tuple:
    sources = []
    for i, volume in enumerate(config.volumes):
        raw = open_volume(*split_path(volume.raw), field=f"volumes.{i}.raw", dtypes=("uint8",))
        labels = open_volume(
            *split_path(volume.labels), field=f"volumes.{i}.labels", dtypes=("uint32", "uint64", "int32", "int64")
        )
        roi = labels.roi
        if volume.roi is not None:
            roi = Roi(volume.roi.offset, volume.roi.shape)
            if not labels.roi.contains(roi):
                raise UserError(f"volumes.{i}.roi: {roi} is not inside the labels' ROI {labels.roi}")
        source = (
            (gp.ArraySource(keys["raw"], raw, interpolatable=True), gp.ArraySource(keys["labels"], labels, interpolatable=False))
            + gp.MergeProvider()
            + gp.Crop(keys["raw"], roi)
            + gp.Crop(keys["labels"], roi)
            + gp.Normalize(keys["raw"])
            # zero padding, exactly what prediction sees beyond the volume
            + gp.Pad(keys["raw"], None)
            + gp.RandomLocation()
        )
        sources.append(source)
    return tuple(sources)


def train(config: TrainConfig, device: str) -> Path:
    experiment = Path(config.experiment_dir)
    experiment.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    spec = config.network.model_dump()
    model = build_network(spec, config.offsets)
    geometry = model.geometry
    output_shape = Coordinate(geometry.valid_output_shape(config.output_shape))
    input_shape = Coordinate(geometry.input_shape(output_shape))

    keys = {name: gp.ArrayKey(name.upper()) for name in ("raw", "labels", "affs", "affs_mask", "prediction")}
    voxel_size = open_volume(*split_path(config.volumes[0].raw), field="volumes.0.raw").voxel_size
    request = gp.BatchRequest()
    request.add(keys["raw"], input_shape * voxel_size)
    for name in ("labels", "affs", "affs_mask", "prediction"):
        request.add(keys[name], output_shape * voxel_size)

    pipeline = (
        _volume_sources(config, keys)
        + gp.RandomProvider()
        + gp.SimpleAugment()
        + gp.IntensityAugment(keys["raw"], 0.9, 1.1, -0.1, 0.1)
        + gp.GrowBoundary(keys["labels"], steps=1, only_xy=True)
        + gp.AddAffinities(config.offsets, keys["labels"], keys["affs"], affinities_mask=keys["affs_mask"], dtype=np.float32)
        # add channel and batch dimensions for torch
        + gp.Unsqueeze([keys["raw"]])
        + gp.Stack(1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    trainer = gp.torch.Train(
        model,
        WeightedMSELoss(),
        optimizer,
        inputs={"raw": keys["raw"]},
        outputs={0: keys["prediction"]},
        loss_inputs={0: keys["prediction"], 1: keys["affs"], 2: keys["affs_mask"]},
        checkpoint_basename=str(experiment / "model"),
        save_every=config.save_every,
        device=device,
    )
    pipeline += trainer

    started = time.time()
    with gp.build(pipeline):
        first = trainer.iteration
        with tqdm(total=config.iterations, initial=first, desc="train", unit="it") as bar:
            while trainer.iteration < config.iterations:
                batch = pipeline.request_batch(request)
                bar.update(1)
                bar.set_postfix(loss=f"{batch.loss:.4f}")
    exported = experiment / "model.pt"
    save_model(exported, spec, [list(o) for o in config.offsets], {k: v.cpu() for k, v in model.state_dict().items()})
    print(
        f"trained iterations {first}..{config.iterations} in {time.time() - started:.0f} s on {device}; "
        f"input {tuple(input_shape)} -> output {tuple(output_shape)} voxels; exported {exported}"
    )
    return exported


def main() -> None:
    parser = argparse.ArgumentParser(prog="python pipeline/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config JSON (see configs/train_fib25.json)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides the config's device")
    args = parser.parse_args()
    config = TrainConfig(**load_json(args.config))
    logging.getLogger("gunpowder").setLevel(logging.WARNING)
    train(config, choose_device(args.device or config.device))


if __name__ == "__main__":
    cli_main(main)
