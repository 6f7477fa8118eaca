"""Block-wise prediction: raw (with context) in; uint8 affinities for the
run's offsets, and the method's extra outputs, out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from funlib.geometry import Coordinate, Roi
from funlib.persistence import Array, open_ds

from pipeline.methods.base import MethodModel
from pipeline.orchestration.devices import choose_device
from pipeline.orchestration.run_layout import RunLayout, load_network
from pipeline.storage.volumes import MissingChunks, open_volume, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker


def _stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    """uint8 datasets hold values in [0, 1] as 0..255: `as_uint8`, done on
    the device so that a quarter of the bytes come back (both round half to
    even, so the two agree exactly; tested)."""
    if dtype == "uint8":
        return (values.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return values.float().cpu().numpy().astype(dtype)


def read_raw(raw: Array, roi: Roi, name: str, outside: str, missing: MissingChunks = "error") -> np.ndarray:
    """Raw over `roi`; beyond the volume zeros, or the volume mirrored at its
    border (PredictConfig.outside). Both depend only on the whole volume,
    never on the block, so block-wise still equals one pass. A chunk
    without a file: see RunConfig.raw_missing_chunks."""
    if outside == "zero":
        return read_roi(raw, roi, name, fill_value=0, missing=missing)
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
    box = read_roi(raw, Roi(raw.roi.begin + low * vs, (high - low) * vs), name, missing=missing)
    return box[(slice(None),) * raw.channel_dims + np.ix_(*(s - lo for s, lo in zip(sources, low)))]


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
    # uint8 crosses to the device: a quarter of float32's bytes; raw is
    # (z, y, x), or (c, z, y, x) for multi-channel (RGB) raw
    tensor = torch.from_numpy(data).to(device)
    tensor = (tensor[None] if data.ndim == 4 else tensor[None, None]).float() / 255.0
    # bf16 autocast only on GPUs: it changes results slightly and buys nothing on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=True) if device.startswith("cuda") else nullcontext()
    with torch.inference_mode(), autocast:
        outputs = {k: v.float() for k, v in model(tensor).items()}
        outputs |= model.predict(outputs, layout.offsets)
    inner = (slice(None), slice(None), *layout.window(roi, roi.grow(margin, margin)))
    return {name: _stored(outputs[name][inner][0], dtype)
            for name, dtype in [("affs", "uint8"), *((name, dtype) for name, _, dtype in layout.extras)]}


def predict_lanes(device: str) -> int:
    """Lanes (workers/loop.py) of a predict worker: while the model works on
    one block, other lanes read their next block or write their last. On
    the CPU the model takes 95% of a block's time, and two lanes hide the
    rest. On a GPU, writing a block takes about twice the model's time;
    on an H100, two and three lanes gave 1.04..1.20x the series, equal
    within the spread of repeated runs, and four or six less (README, "GPU
    prediction")."""
    return 3 if device.startswith("cuda") else 2


class BlockPredictor:
    """The predict step's three phases for one block, and the block as a
    whole. The model runs one block at a time (a lock), so that lanes
    overlap only the reading and writing around it."""

    def __init__(self, run: WorkerRun):
        self.device = choose_device(run.config.predict.device, run.worker_id)
        if self.device.startswith("cuda"):
            # every block has the same shape: cuDNN's timed choice of
            # convolution algorithms, made on the first, serves them all
            torch.backends.cudnn.benchmark = True
        self.model = load_network(run.config).to(self.device)
        self.raw = open_volume(*split_path(run.config.raw), field="raw")
        self.raw_name = run.config.raw
        self.outside = run.config.predict.outside
        self.missing = run.config.raw_missing_chunks
        self.layout = run.layout
        names = ("affs", *(e[0] for e in self.layout.extras))
        self.datasets = {name: open_ds(run.run_dir.volumes / name, mode="r+") for name in names}
        self.model_lock = threading.Lock()

    def read(self, roi: Roi) -> np.ndarray:
        context = self.layout.predict_read_context
        return read_raw(self.raw, roi.grow(context, context), self.raw_name, self.outside, self.missing)

    def infer(self, data: np.ndarray, roi: Roi) -> dict[str, np.ndarray]:
        with self.model_lock:
            return infer(self.model, data, roi, self.layout, self.device)

    def write(self, roi: Roi, prediction: dict[str, np.ndarray]) -> None:
        # blocks at the far edges overhang the volume: the whole (valid-
        # shaped) block was predicted, keep the part inside
        inside = roi.intersect(self.layout.roi)
        for name, values in prediction.items():
            self.datasets[name][inside] = values[(slice(None), *self.layout.window(inside, roi))]

    def __call__(self, block) -> None:
        roi = block.write_roi
        self.write(roi, self.infer(self.read(roi), roi))


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    yield BlockPredictor(run)


def main() -> None:
    run_worker(setup, "predict", lanes=lambda run: predict_lanes(choose_device(run.config.predict.device, run.worker_id)))


if __name__ == "__main__":
    main()
