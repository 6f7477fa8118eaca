"""Where a predict worker's time goes: reading raw, the model, writing; and
what the worker's overlapped lanes make of it.

    python benchmarks/predict_phases.py [--device cpu|cuda] [--blocks N]
        [--output-shape Z Y X] [--whole-volume] [--repeat N] [--lanes N ...]
        [--peak-tflops F]

Runs the predict worker's own `BlockPredictor` (workers/predict.py) with the
bundled model on the demo's sample (configs/demo.json; --whole-volume: all of
the sample, 160 x 250 x 250 voxels, not the demo's 40 sections), in a scratch
run directory; --repeat goes over the blocks that many times, for a GPU that
would otherwise finish before it is warm:

1. in series, block by block: the seconds spent reading, in the model and
   writing, the output voxels per second, and the fraction of wall time the
   model is busy (the share that overlapping can win back);
2. overlapped, as the worker runs them (lanes, workers/loop.py), once per
   number of lanes asked for (default: the worker's choice for the device):
   voxels per second and the speed-up over the series.

Also prints the model's FLOPs per output voxel (counted by torch on one
block, the context included) and, given --peak-tflops (the device's dense
bf16 peak), the fraction of it the model reaches.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import daisy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from funlib.geometry import Roi  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.config import RunConfig, load_json  # noqa: E402
from pipeline.orchestration.job import open_run  # noqa: E402
from workers.loop import WorkerRun, run_lanes  # noqa: E402
from workers.predict import BlockPredictor, predict_lanes  # noqa: E402


def flops_per_voxel(predictor: BlockPredictor, roi: Roi) -> float:
    """The model's FLOPs for one block over the block's voxels."""
    data = predictor.read(roi)
    with FlopCounterMode(display=False) as counter:
        predictor.infer(data, roi)
    return counter.get_total_flops() / np.prod(roi.shape / predictor.layout.voxel_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--blocks", type=int, default=0, help="stop after this many blocks (default: all)")
    parser.add_argument("--output-shape", type=int, nargs=3, help="predict.output_shape in voxels (default: the demo's)")
    parser.add_argument("--whole-volume", action="store_true", help="predict all of the sample, not the demo's ROI")
    parser.add_argument("--repeat", type=int, default=1, help="go over the blocks this many times (default 1)")
    parser.add_argument("--lanes", type=int, nargs="+", help="lanes to compare (default: the worker's choice)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for the fraction reached")
    parser.add_argument("--run-dir", default=str(REPO / "runs/bench_predict_phases"), help="scratch run directory (replaced)")
    args = parser.parse_args()

    shutil.rmtree(args.run_dir, ignore_errors=True)
    demo = load_json(REPO / "configs/demo.json")
    predict = {**demo["predict"], "device": args.device}
    if args.output_shape:
        predict["output_shape"] = args.output_shape
    if args.whole_volume:
        demo["roi"] = None
    config = RunConfig(**{**demo, "run_dir": args.run_dir, "ground_truth": None, "predict": predict,
                          "raw": str(REPO / demo["raw"]), "model": {"checkpoint": str(REPO / demo["model"]["checkpoint"])}})
    layout, run_dir = open_run(config)
    predictor = BlockPredictor(WorkerRun(config, layout, run_dir))

    shape = layout.predict_output
    grid = [range(b, e, s) for b, e, s in zip(layout.roi.begin, layout.roi.end, shape)]
    blocks = [Roi((z, y, x), shape) for z in grid[0] for y in grid[1] for x in grid[2]]
    if args.blocks:
        blocks = blocks[: args.blocks]
    blocks = blocks * args.repeat
    # the first block pays for torch's one-time set-up (and CUDA's): not a rate
    flops = flops_per_voxel(predictor, blocks[0])
    voxels = sum(int(np.prod(b.intersect(layout.roi).shape / layout.voxel_size)) for b in blocks)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    print(f"{len(blocks)} blocks of {tuple(shape / layout.voxel_size)} voxels ({voxels / 1e6:.2f} Mvoxel inside the ROI), "
          f"device {predictor.device}; model {flops / 1e3:.0f} kFLOP per output voxel")
    print(f"{'block':>5}{'read s':>9}{'model s':>9}{'write s':>9}")
    totals = np.zeros(3)
    for k, roi in enumerate(blocks):
        t0 = time.perf_counter()
        data = predictor.read(roi)
        t1 = time.perf_counter()
        prediction = predictor.infer(data, roi)
        synchronize()
        t2 = time.perf_counter()
        predictor.write(roi, prediction)
        t3 = time.perf_counter()
        phases = np.array([t1 - t0, t2 - t1, t3 - t2])
        totals += phases
        print(f"{k:>5}" + "".join(f"{p:>9.3f}" for p in phases))
    series = totals.sum()
    print(f"in series: read {totals[0]:.2f} s, model {totals[1]:.2f} s, write {totals[2]:.2f} s; "
          f"{voxels / series / 1e6:.3f} Mvoxel/s; model busy {totals[1] / series:.0%} of the wall time")

    for lanes in args.lanes or [predict_lanes(predictor.device)]:
        queue = iter(blocks)
        lock = threading.Lock()

        def acquire():
            with lock:
                roi = next(queue, None)
            return nullcontext(None if roi is None else daisy.Block(layout.roi, roi, roi))

        t0 = time.perf_counter()
        run_lanes(predictor, lanes, lambda: acquire)
        synchronize()
        overlapped = time.perf_counter() - t0
        rate = voxels / overlapped
        print(f"overlapped ({lanes} lanes): {overlapped:.2f} s, {rate / 1e6:.3f} Mvoxel/s, "
              f"{series / overlapped:.2f}x the series (its model time is {totals[1] / overlapped:.0%} of this wall time)")
        reached = rate * flops / 1e12
        peak = f", {reached / args.peak_tflops:.1%} of the {args.peak_tflops:g} TFLOP/s peak" if args.peak_tflops else ""
        print(f"    model arithmetic: {reached:.2f} TFLOP/s{peak}")

if __name__ == "__main__":
    main()
