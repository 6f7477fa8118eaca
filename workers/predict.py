"""Block-wise affinity prediction: raw (with context) in, uint8 affinities out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from funlib.geometry import Roi
from funlib.persistence import Array, open_ds

from pipeline.devices import choose_device
from pipeline.run_layout import load_network
from pipeline.volumes import open_volume, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker


def predict_roi(network: torch.nn.Module, raw: Array, output_roi: Roi, context: Roi, device: str) -> np.ndarray:
    """Affinities (C, z, y, x) as uint8 for `output_roi`, which must be a
    valid output shape of the network. Raw outside the volume reads as 0,
    exactly as in training (gunpowder's Pad)."""
    data = raw.to_ndarray(output_roi.grow(context, context), fill_value=0)
    tensor = torch.from_numpy(data.astype(np.float32) / 255.0)[None, None].to(device)
    # bf16 autocast only on GPUs: it changes results slightly and buys nothing on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    with torch.inference_mode(), autocast:
        affs = network(tensor)[0].float().cpu().numpy()
    return np.round(affs * 255).astype(np.uint8)


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    device = choose_device(run.config.predict.device, run.worker_id)
    network = load_network(run.config).to(device)
    raw = open_volume(*split_path(run.config.raw), field="raw")
    affs = open_ds(run.run_dir.volumes / "affs", mode="r+")
    context = run.layout.predict_context

    def process_block(block) -> None:
        # blocks at the far edges overhang the volume: predict the whole
        # (valid-shaped) block, keep the part inside
        prediction = predict_roi(network, raw, block.write_roi, context, device)
        inside = block.write_roi.intersect(affs.roi)
        affs[inside] = prediction[(slice(None), *run.layout.window(inside, block.write_roi))]

    yield process_block


def main() -> None:
    run_worker(setup, "predict")


if __name__ == "__main__":
    main()
