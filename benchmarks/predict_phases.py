"""Where a predict worker's time goes: reading raw, the model, writing.

    python benchmarks/predict_phases.py [--device cpu|cuda] [--blocks N]

Runs the predict step's own functions (workers/predict.py: `read_raw`,
`infer`, the write into the run's `affs`) block by block, in series as the
worker does, with the bundled model on the demo's sample and blocks
(configs/demo.json), in a scratch run directory. Prints per block the
seconds spent in each phase, then the totals, the output voxels per second
and the fraction of wall time the model is busy: the share an overlapped
reader and writer could win back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from funlib.geometry import Roi  # noqa: E402
from funlib.persistence import open_ds  # noqa: E402

from pipeline.config import RunConfig, load_json  # noqa: E402
from pipeline.orchestration.run_layout import load_network  # noqa: E402
from pipeline.predict import open_run  # noqa: E402
from pipeline.storage.volumes import open_volume, split_path  # noqa: E402
from workers.predict import infer, read_raw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--blocks", type=int, default=0, help="stop after this many blocks (default: all)")
    parser.add_argument("--run-dir", default=str(REPO / "runs/bench_predict_phases"), help="scratch run directory (replaced)")
    args = parser.parse_args()

    shutil.rmtree(args.run_dir, ignore_errors=True)
    demo = load_json(REPO / "configs/demo.json")
    config = RunConfig(**{**demo, "run_dir": args.run_dir, "ground_truth": None,
                          "raw": str(REPO / demo["raw"]), "model": {"checkpoint": str(REPO / demo["model"]["checkpoint"])}})
    layout, run_dir = open_run(config)
    model = load_network(config).to(args.device)
    raw = open_volume(*split_path(config.raw), field="raw")
    affs = open_ds(run_dir.volumes / "affs", mode="r+")
    context = layout.predict_read_context

    shape = layout.predict_output
    grid = [range(b, e, s) for b, e, s in zip(layout.roi.begin, layout.roi.end, shape)]
    blocks = [Roi((z, y, x), shape) for z in grid[0] for y in grid[1] for x in grid[2]]
    if args.blocks:
        blocks = blocks[: args.blocks]
    # the first block pays for torch's one-time set-up: not a rate
    infer(model, read_raw(raw, blocks[0].grow(context, context), config.raw, config.predict.outside), blocks[0], layout, args.device)

    print(f"{len(blocks)} blocks of {tuple(shape / layout.voxel_size)} voxels, device {args.device}")
    print(f"{'block':>5}{'read s':>9}{'model s':>9}{'write s':>9}")
    totals = np.zeros(3)
    for k, block in enumerate(blocks):
        t0 = time.perf_counter()
        data = read_raw(raw, block.grow(context, context), config.raw, config.predict.outside)
        t1 = time.perf_counter()
        result = infer(model, data, block, layout, args.device)
        t2 = time.perf_counter()
        inside = block.intersect(layout.roi)
        affs[inside] = result["affs"][(slice(None), *layout.window(inside, block))]
        t3 = time.perf_counter()
        phases = np.array([t1 - t0, t2 - t1, t3 - t2])
        totals += phases
        print(f"{k:>5}" + "".join(f"{p:>9.3f}" for p in phases))
    voxels = sum(int(np.prod(b.intersect(layout.roi).shape / layout.voxel_size)) for b in blocks)
    wall = totals.sum()
    print(f"total: read {totals[0]:.2f} s, model {totals[1]:.2f} s, write {totals[2]:.2f} s; "
          f"{voxels / wall / 1e6:.3f} Mvoxel/s; model busy {totals[1] / wall:.0%} of the wall time")


if __name__ == "__main__":
    main()
