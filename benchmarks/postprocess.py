"""Post-processing throughput and memory on the bundled 160 x 250 x 250 sample.

    python benchmarks/postprocess.py [--workers N] [--block Z Y X]

Runs the real main job (predict.py, local workers, SQLite) over the whole
sample with the bundled model, then prints, from the run's report.json, the
throughput of fragments, agglomerate and relabel in Mvoxel/s per core
(voxels / in-block CPU seconds summed over workers), the peak resident
memory of any worker, and the scores of the result against the sample's
ground truth (`make bench` ingests it first), so that speed and accuracy
are read together. Design target: >= 1 Mvoxel/s per core.

It also prints the agglomerate step's graph-store time per block: each
block's edges, read back from the run's store, written again as its worker
wrote them (a replace, so the graph stays as it was).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STEPS = ("fragments", "agglomerate", "relabel")


def warm_kernels() -> None:
    """Compile the workers' numba kernels once, here, into their on-disk
    cache: on a fresh clone or after a change to a kernel, every worker
    would otherwise compile them in its first block (about 6 CPU s each),
    and compiling is not the rate."""
    import numpy as np

    from pipeline.kernels.rag import edge_means
    from pipeline.kernels.watershed import epsilon_agglomerate, merge_history, relabel_consecutive

    affs = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 6)).astype(np.uint8)
    labels, _ = relabel_consecutive(epsilon_agglomerate(affs, None, 0.1, "hist_quant_50"))
    for scoring in ("hist_quant_50", "mean"):
        uv, _ = merge_history(affs, labels, scoring)
    edge_means(labels, affs, [(-1, 0, 0)], uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64))


def store_time_per_block(run: Path) -> tuple[float, float]:
    """Seconds and edges per agglomerate block of `store.write_edges`."""
    import numpy as np

    from pipeline.orchestration.run_layout import RunDir
    from pipeline.storage.graph_records import EDGE_ATTRIBUTES
    from pipeline.storage.graph_store import open_store

    directory = RunDir(run)
    blocks = range(int(np.prod(directory.read_layout().block_grid)))
    with open_store("sqlite", run, directory.run_id()) as store:
        graph = [store.read_edges([b], list(EDGE_ATTRIBUTES)) for b in blocks]
        started = time.perf_counter()
        for block, edges in zip(blocks, graph):
            store.write_edges(block, edges)
        seconds = time.perf_counter() - started
    return seconds / len(blocks), sum(map(len, graph)) / len(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="post-processing workers (default 2)")
    parser.add_argument("--block", type=int, nargs=3, default=(80, 125, 125), metavar=("Z", "Y", "X"),
                        help="post-processing block in voxels (default 80 125 125: 8 blocks)")
    parser.add_argument("--ground-truth", default=str(REPO / "runs/fib25.zarr/labels"),
                        help="labels to score against (default: the one make ingests); 'none' to skip")
    parser.add_argument("--run-dir", default=str(REPO / "runs/bench_postprocess"), help="scratch run directory (replaced)")
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    voxel = 10
    block = [b * voxel for b in args.block]
    config = {
        "run_dir": str(run_dir / "run"),
        "raw": str(REPO / "data/fib25_medulla/fib25.zarr/raw"),
        "ground_truth": None if args.ground_truth == "none" else args.ground_truth,
        "model": {"checkpoint": str(REPO / "models/fib25_mala.pt")},
        "predict": {"device": "auto", "output_shape": [40, 128, 128], "workers": 1},
        # about 1/8 of the block as context on each side, as in the design
        "postprocess": {"block_shape": block, "context": [max(voxel, b // 8 // voxel * voxel) for b in block], "workers": args.workers},
    }
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    warm_kernels()
    subprocess.run([sys.executable, str(REPO / "pipeline/predict.py"), str(config_path)], check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((run_dir / "run" / "report.json").read_text())
    voxels = report["volume_voxels"]
    steps = report["steps"]

    print(f"volume {voxels / 1e6:.2f} Mvoxel, block {tuple(args.block)} voxels, {steps['fragments']['blocks']} blocks, "
          f"{args.workers} workers")
    print(f"{'step':<12}{'cpu s':>9}{'Mvox/s/core':>13}{'wall s':>9}{'peak RSS MB':>13}")
    for step in ("predict", *STEPS):
        s = steps[step]
        rate = voxels / s["cpu_s"] / 1e6 if s["cpu_s"] else float("nan")
        print(f"{step:<12}{s['cpu_s']:>9.2f}{rate:>13.2f}{s['wall_s']:>9.2f}{s['peak_worker_rss_bytes'] / 2**20:>13.0f}")
    cpu = sum(steps[s]["cpu_s"] for s in STEPS)
    peak = max(steps[s]["peak_worker_rss_bytes"] for s in STEPS)
    print(f"fragments + agglomerate + relabel: {voxels / cpu / 1e6:.2f} Mvoxel/s per core "
          f"({cpu:.2f} CPU s); peak worker memory {peak / 2**20:.0f} MB")
    print(f"segments (LUTs, master): {steps['segments']['wall_s']:.2f} s for {report['graph']['edges']} edges")
    seconds, edges = store_time_per_block(run_dir / "run")
    print(f"agglomerate, graph store: {seconds * 1e3:.1f} ms per block ({edges:.0f} edges, "
          f"{edges / seconds / 1e6:.2f} M edges/s)")
    for row in report.get("scores", []):
        print(f"threshold {row['threshold']:.2f}: VOI {row['voi']:.4f} (split {row['voi_split']:.4f}, "
              f"merge {row['voi_merge']:.4f}), ARAND {row['arand']:.4f}")


if __name__ == "__main__":
    main()
