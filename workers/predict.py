"""Block-wise prediction: raw (with context) in; uint8 affinities for the
run's offsets, and the method's extra outputs, out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from funlib.geometry import Coordinate, Roi
from funlib.persistence import Array, open_ds

from pipeline.methods.base import MethodModel
from pipeline.orchestration.devices import choose_device
from pipeline.orchestration.run_layout import RunLayout, load_network
from pipeline.storage.volumes import as_uint8, open_volume, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker


def _stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    """uint8 datasets hold values in [0, 1] as 0..255."""
    values = values.float().cpu().numpy()
    return as_uint8(values) if dtype == "uint8" else values.astype(dtype)


def read_raw(raw: Array, roi: Roi, name: str, outside: str) -> np.ndarray:
    """Raw over `roi`; beyond the volume zeros, or the volume mirrored at its
    border (PredictConfig.outside). Both depend only on the whole volume,
    never on the block, so block-wise still equals one pass."""
    if outside == "zero":
        return read_roi(raw, roi, name, fill_value=0)
    vs = raw.voxel_size
    # per axis, the volume index each requested voxel mirrors to (numpy's
    # "reflect": the border voxel is not repeated), then one read of their
    # bounding box
    sources = []
    for begin, size, origin, n, v in zip(roi.begin, roi.shape, raw.roi.begin, raw.shape, vs):
        index = np.arange(size // v) + (begin - origin) // v
        folded = np.abs(index) % max(2 * (n - 1), 1)
        sources.append(np.where(folded >= n, 2 * (n - 1) - folded, folded))
    low = Coordinate(int(s.min()) for s in sources)
    high = Coordinate(int(s.max()) + 1 for s in sources)
    box = read_roi(raw, Roi(raw.roi.begin + low * vs, (high - low) * vs), name)
    return box[np.ix_(*(s - lo for s, lo in zip(sources, low)))]


def predict_roi(model: MethodModel, raw: Array, roi: Roi, layout: RunLayout, device: str, raw_name: str = "raw",
                outside: str = "zero") -> dict[str, np.ndarray]:
    """`affs` (C, z, y, x) uint8 for the layout's offsets and the layout's
    extra outputs over `roi`, whose shape must be a valid output shape of
    the network once grown by the margin. Raw outside the volume is
    `outside` (`read_raw`). `raw_name` names the raw dataset in a read
    error."""
    data = read_raw(raw, roi.grow(layout.predict_read_context, layout.predict_read_context), raw_name, outside)
    return infer(model, data, roi, layout, device)


def infer(model: MethodModel, data: np.ndarray, roi: Roi, layout: RunLayout, device: str) -> dict[str, np.ndarray]:
    """The network's part of `predict_roi`: raw (uint8, `roi` grown by the
    read context) in, the stored datasets' values over `roi` out."""
    margin = layout.predict_margin
    tensor = torch.from_numpy(data.astype(np.float32) / 255.0)[None, None].to(device)
    # bf16 autocast only on GPUs: it changes results slightly and buys nothing on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=True) if device.startswith("cuda") else nullcontext()
    with torch.inference_mode(), autocast:
        outputs = {k: v.float() for k, v in model(tensor).items()}
        affs = model.affinities(outputs, layout.offsets)
    inner = (slice(None), slice(None), *layout.window(roi, roi.grow(margin, margin)))
    result = {"affs": _stored(affs[inner][0], "uint8")}
    for name, _, dtype in layout.extras:
        result[name] = _stored(outputs[name][inner][0], dtype)
    return result


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    device = choose_device(run.config.predict.device, run.worker_id)
    model = load_network(run.config).to(device)
    raw = open_volume(*split_path(run.config.raw), field="raw")
    layout = run.layout
    datasets = {name: open_ds(run.run_dir.volumes / name, mode="r+") for name in ("affs", *(e[0] for e in layout.extras))}

    def process_block(block) -> None:
        # blocks at the far edges overhang the volume: predict the whole
        # (valid-shaped) block, keep the part inside
        prediction = predict_roi(model, raw, block.write_roi, layout, device, run.config.raw, run.config.predict.outside)
        inside = block.write_roi.intersect(layout.roi)
        for name, values in prediction.items():
            datasets[name][inside] = values[(slice(None), *layout.window(inside, block.write_roi))]

    yield process_block


def main() -> None:
    run_worker(setup, "predict")


if __name__ == "__main__":
    main()
