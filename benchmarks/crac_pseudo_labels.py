"""How good a CRAC run's pseudo-labels are: for each checkpoint, the
fraction of the pairs the teacher labels (the unlabelled pairs, both pixels
unannotated, after the entropy filter) whose thresholded prediction
disagrees with the dense ground truth, both ways (F teaching E, E teaching
F), and the error on the truly "different" pairs (pairs spanning two
nuclei, where splits are decided).

    python benchmarks/crac_pseudo_labels.py TRAIN_CONFIG DENSE_LABELS [--pages 3 11 19 27] [--every 500]

TRAIN_CONFIG is a CRAC training config on a 2D sparse volume with an
annotation mask (configs/train_nuclei_crac.json); DENSE_LABELS the dense
labels of the same pages (runs/nuclei.zarr/labels); the pages' voxel size
is 1 (the nuclei). Prints one row per checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from funlib.geometry import Roi

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import load_json  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.methods import build_model  # noqa: E402
from pipeline.methods.base import label_affinities  # noqa: E402
from pipeline.methods.crac import alpha_at, confident, pair_regions  # noqa: E402
from pipeline.methods.embedding import cosine_affinities  # noqa: E402
from pipeline.storage.volumes import open_volume, split_path  # noqa: E402
from pipeline.training.checkpoints import latest_checkpoint, network_state, read_checkpoint  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from workers.predict import read_raw  # noqa: E402


def predictions(model, raw, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E's ReLU(cosine) and F's affinities of page z, read as the predict
    step reads it (`predict.outside: mirror`), padded to the network's grid."""
    crop = model.backbone.spec.crop[1]
    grid = int(np.prod([f[1] for f in model.backbone.spec.downsample_factors]))
    height, width = raw.shape[-2:]
    pad = [crop + (-(s + 2 * crop)) % grid for s in (height, width)]
    roi = Roi((z, -crop, -crop), (1, height + crop + pad[0], width + crop + pad[1])) * raw.voxel_size
    x = torch.from_numpy(read_raw(raw, roi, "raw", "mirror").astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        embedding, _ = model.implicit(x)
        implicit = cosine_affinities(embedding, model.offsets)[0].clamp(min=0)
        explicit = model.explicit(x)["affinities"]
    inside = (Ellipsis, slice(0, height), slice(0, width))
    return implicit[inside], explicit[inside]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/crac_pseudo_labels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_config")
    parser.add_argument("dense_labels", help="CONTAINER.zarr/DATASET: the dense labels of the training pages")
    parser.add_argument("--pages", type=int, nargs="+", default=[3, 11, 19, 27])
    parser.add_argument("--every", type=int, default=500, help="checkpoints at multiples of this iteration")
    args = parser.parse_args()
    train = TrainConfig(**load_json(args.train_config))
    if train.method.name != "crac" or len(train.volumes) != 1 or train.volumes[0].labels_mask is None:
        raise UserError("train_config: needs a crac method and one volume with a labels_mask")
    volume = train.volumes[0]
    experiment = Path(train.experiment_dir)
    last = latest_checkpoint(experiment)
    if last is None:
        raise UserError(f"train_config: {experiment} holds no checkpoint yet")
    model = build_model(train.method, train.network.model_dump(), train.offsets).eval()
    raw = open_volume(*split_path(volume.raw), field="raw")
    sections = {name: open_volume(*split_path(path), field=name).data
                for name, path in (("dense", args.dense_labels), ("mask", volume.labels_mask))}
    print("| iteration | F teaching E | E teaching F | F on true \"different\" pairs | E on true \"different\" pairs |")
    print("| --- | --- | --- | --- | --- |")
    for iteration in range(args.every, last[0] + 1, args.every):
        model.load_state_dict(network_state(read_checkpoint(experiment / f"model_checkpoint_{iteration}")))
        alpha = alpha_at(train.method.entropy, iteration) if train.method.entropy is not None else 0.0
        errors = []
        for z in args.pages:
            implicit, explicit = predictions(model, raw, z)
            dense, annotated = (torch.from_numpy(np.asarray(sections[name][z]).astype(np.int64))[None, None]
                                for name in ("dense", "mask"))
            truth, inside = label_affinities(dense, torch.ones_like(dense), model.offsets)
            _, unlabelled = pair_regions(annotated, model.offsets)
            unlabelled = unlabelled & inside
            same = truth > 0.5
            different = unlabelled & ~same
            errors.append([
                ((explicit > 0.5) != same)[confident(explicit, unlabelled, alpha)].float().mean().item(),
                ((implicit > 0.5) != same)[confident(implicit, unlabelled, alpha)].float().mean().item(),
                ((explicit > 0.5) != same)[different].float().mean().item(),
                ((implicit > 0.5) != same)[different].float().mean().item(),
            ])
        mean = np.mean(errors, axis=0)
        print(f"| {iteration} | " + " | ".join(f"{v:.3f}" for v in mean) + " |", flush=True)


if __name__ == "__main__":
    cli_main(main)
