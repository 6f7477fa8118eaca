"""What the latent-mask method costs at predict time, per voxel: the
network, the mask decoder (every voxel's mask of every level) and MaskAggr,
in FLOPs and bytes (counted from the shapes) and measured on this machine.

    python benchmarks/latent_masks.py [TRAIN_CONFIG] [--shape Y X] [--repeat N]
    (TRAIN_CONFIG: configs/train_nuclei_latent.json; its backbone, method
    and offsets, with untrained weights: the cost does not depend on them)

One 2D page of SHAPE pixels (default a nuclei page, 520 x 696) through
the model on the CPU, `--repeat` times; prints each stage's seconds, its
Mvoxel/s (output voxels per second, this process's threads) and the
counted work per output voxel.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import load_json  # noqa: E402
from pipeline.methods import build_model  # noqa: E402
from pipeline.methods.latent_masks import Settings  # noqa: E402
from pipeline.methods.mask_aggregation import aggregate_masks, window_positions  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402


def decoder_flops(settings: Settings, window) -> float:
    """FLOPs (2 per multiply-add) of decoding one mask."""
    k, q, maps = math.prod(window), settings.latent_dim, settings.decoder_maps
    kernel = math.prod(3 if s > 1 else 1 for s in window)
    return 2.0 * (q * maps * k + 2 * maps * maps * kernel * k + maps * k)


def maskaggr_work(window, factors, offsets) -> tuple[float, float]:
    """(FLOPs, bytes from memory) of MaskAggr per output voxel on the CPU
    (the compiled kernel): per offset and level, one Welford update (about
    12 FLOPs: min, max, and the weighted mean and spread) per mask holding
    the pair, on running sums kept in registers; from memory, each level's
    masks once as the network wrote them, once copied channel-last and
    read back, and the three running sums read and written once a level.
    (The torch form, on a GPU, reads and writes the sums at every update.)"""
    positions = set(window_positions(window))
    flops = data = 0.0
    for factor in factors:
        phases = list(itertools.product(*(range(f) for f in factor)))
        for offset in offsets:
            held = 0
            for phase in phases:
                step = tuple((r + o) // f for r, o, f in zip(phase, offset, factor))
                held += sum(tuple(d + s for d, s in zip(delta, step)) in positions for delta in positions)
            flops += 12 * held / len(phases)
        data += 3 * len(positions) * 4 / math.prod(factor) + 3 * 2 * len(offsets) * 4
    return flops, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(REPO / "configs/train_nuclei_latent.json"))
    parser.add_argument("--shape", type=int, nargs=2, default=(520, 696), metavar=("Y", "X"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = TrainConfig(**load_json(args.config))
    model = build_model(config.method, config.network, config.offsets).eval()
    geometry = model.geometry
    output = geometry.valid_output_shape((1, *args.shape))
    raw = torch.rand((1, 1, *geometry.input_shape(output)))
    voxels = math.prod(output)
    offsets = [tuple(o) for o in config.offsets]
    stages = {"network": 0.0, "decoder": 0.0, "maskaggr": 0.0}
    with torch.inference_mode():
        for _ in range(args.repeat):
            started = time.perf_counter()
            outputs = model(raw)
            stages["network"] += time.perf_counter() - started
            started = time.perf_counter()
            levels = [(model.decode(outputs[f"latent_{k}"]), f) for k, f in enumerate(model.factors)]
            stages["decoder"] += time.perf_counter() - started
            started = time.perf_counter()
            aggregate_masks(levels, model.window, offsets)
            stages["maskaggr"] += time.perf_counter() - started
    masks_per_voxel = sum(1 / math.prod(f) for f in model.factors)
    flops, data = maskaggr_work(model.window, model.factors, offsets)
    work = {
        "decoder": (decoder_flops(config.method, model.window) * masks_per_voxel,
                    masks_per_voxel * math.prod(model.window) * 4),
        "maskaggr": (flops, data),
    }
    print(f"{args.config}: output {output} voxels, window {model.window}, levels {model.factors}, "
          f"{len(offsets)} offsets, {torch.get_num_threads()} threads, {args.repeat} repeats")
    print(f"{'stage':<10}{'s per page':>12}{'Mvoxel/s':>10}{'GFLOP/s':>15}{'FLOPs/voxel':>13}{'bytes/voxel':>13}")
    for stage, seconds in stages.items():
        per = seconds / args.repeat
        flops, data = work.get(stage, (float("nan"), float("nan")))
        print(f"{stage:<10}{per:>12.3f}{voxels / per / 1e6:>10.3f}{flops * voxels / per / 1e9:>15.2f}"
              f"{flops:>13.0f}{data:>13.0f}")


if __name__ == "__main__":
    main()
