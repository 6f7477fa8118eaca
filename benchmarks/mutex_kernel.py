"""The image mutex watershed on one block: affseg's compiled kernel
(pipeline/kernels/mutex.py) against `mwatershed.agglom`, the library call
it replaced, on the same uint8 affinities, each in a process of its own.

    python benchmarks/mutex_kernel.py [AFFS] [--block Z Y X] [--rounds N]
    (AFFS: runs/bench_postprocess/waterz/volumes.zarr/affs, `make bench`'s
    predicted affinities of the bundled model)

The block is the bench's post-processing block and context (80 x 125 x 125
and 10 x 15 x 15 voxels on each side: 100 x 155 x 155) at the volume's
centre, with `make bench`'s mutex settings (the methods notes' split biases,
0 for the nearest neighbours and 1 for the long-range offsets; long-range
stride 1 3 3). Prints per implementation the best of N rounds of wall time
on one core (after a warm-up call), Mvoxel/s, the process's peak resident
memory, and the adjusted Rand error between the two partitions: the
kernel takes tied edges in its own documented order, mwatershed in its
sort's, so the partitions may differ where ties decide.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BIASES = [0.0] * 3 + [1.0] * 9
STRIDE = (1, 3, 3)


def partition(which: str, affs: np.ndarray, offsets) -> np.ndarray:
    from pipeline.kernels.mutex import long_range_strides, mutex_watershed, stride_mask

    strides = long_range_strides(offsets, STRIDE)
    if which == "affseg":
        return mutex_watershed(affs, offsets, BIASES, strides)
    import mwatershed

    # what pipeline/kernels/mutex.py did before its kernel: float64 weights,
    # edges off the stride grid weigh 0, mwatershed.agglom
    weights = affs.astype(np.float64) / 255.0 - np.asarray(BIASES).reshape(-1, 1, 1, 1)
    for c, offset in enumerate(offsets):
        if strides[c] is not None:
            weights[c][~stride_mask(affs.shape[1:], offset, strides[c])] = 0.0
    return mwatershed.agglom(weights, [list(o) for o in offsets]).astype(np.uint64)


def child(which: str, block_file: str, rounds: int, out_file: str) -> None:
    if which.startswith("affseg"):
        import pipeline.kernels.mutex as kernel

        # "affseg:N": ties shuffled in runs of N edges (0: not shuffled)
        run = int(which.split(":")[1])
        kernel.TIE_RUN = run if run > 0 else 2**62
        which = "affseg"
    data = np.load(block_file)
    affs, offsets = data["affs"], data["offsets"].tolist()
    partition(which, affs, offsets)  # compile or load the kernels, untimed
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        labels = partition(which, affs, offsets)
        best = min(best, time.perf_counter() - started)
    np.save(out_file, labels)
    print(json.dumps({"seconds": best, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("affs", nargs="?", default=str(REPO / "runs/bench_postprocess/waterz/volumes.zarr/affs"))
    parser.add_argument("--block", type=int, nargs=3, default=(100, 155, 155), metavar=("Z", "Y", "X"),
                        help="voxels (default 100 155 155: the bench's block and context)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per implementation (best counts)")
    parser.add_argument("--tie-runs", type=int, nargs="+", default=[8], metavar="N",
                        help="affseg's kernel with ties shuffled in runs of N edges, N a power of two, one row "
                             "each (0: unshuffled; default 8, the kernel's TIE_RUN)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.rounds, args.child[2])

    from funlib.persistence import open_ds

    from pipeline.evaluation.metrics import Contingency, scores

    if any(run < 0 or run & (run - 1) for run in args.tie_runs):
        sys.exit(f"mutex_kernel: --tie-runs takes 0 or powers of two, not {args.tie_runs}")
    path = Path(args.affs)
    if not path.exists():
        sys.exit(f"mutex_kernel: {path} does not exist: run `make bench` first, or name affinities")
    volume = open_ds(path)
    offsets = json.loads((path.parent.parent / "layout.json").read_text())["offsets"]
    shape = np.array(volume.shape[1:])
    start = (shape - args.block) // 2
    if (start < 0).any():
        sys.exit(f"mutex_kernel: the block {args.block} is larger than the volume {tuple(shape)}")
    affs = np.asarray(volume.data[(slice(None), *(slice(s, s + b) for s, b in zip(start, args.block)))])
    print(f"block {tuple(args.block)} of {path} at {tuple(int(s) for s in start)}: {affs.shape[0]} offsets, "
          f"biases 0 (nearest neighbours) / 1 (long-range), long-range stride {STRIDE}")
    voxels = int(np.prod(args.block))
    with tempfile.TemporaryDirectory() as scratch:
        block_file = f"{scratch}/block.npz"
        np.savez(block_file, affs=affs, offsets=np.array(offsets))
        labels = {}
        for which in ["mwatershed"] + [f"affseg:{run}" for run in args.tie_runs]:
            out_file = f"{scratch}/{which}.npy"
            result = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--child", which,
                                     block_file, out_file], capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"mutex_kernel: the {which} run failed:\n{result.stderr[-2000:]}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            labels[which] = np.load(out_file)
            print(f"{which:<14} {figures['seconds']:7.2f} s  {voxels / figures['seconds'] / 1e6:6.2f} Mvoxel/s  "
                  f"peak RSS {figures['peak_rss_mb']:6.0f} MB  {len(np.unique(labels[which]))} segments")
    # mwatershed labels every voxel that joined no other 0: each its own segment
    theirs = labels["mwatershed"].astype(np.int64)
    alone = theirs == 0
    theirs[alone] = -np.arange(1, alone.sum() + 1)
    for which in labels:
        if which.startswith("affseg"):
            table = Contingency()
            table.add(labels[which], theirs - theirs.min() + 1)
            print(f"ARAND between {which} and mwatershed: {scores(table)['arand']:.4f}")


if __name__ == "__main__":
    main()
