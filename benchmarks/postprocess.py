"""Post-processing throughput and memory on the bundled 160 x 250 x 250 sample.

    python benchmarks/postprocess.py [--workers N] [--block Z Y X] [--partition both|waterz|mutex_3d] [--one-block]

Runs the real main job (predict.py, local workers, SQLite) over the whole
sample with the bundled model, then the mutex_3d path on the same
affinities (given, so only the post-processing runs), and prints for each,
from the run's report.json, the throughput of its block steps (waterz:
fragments, agglomerate and relabel) in Mvoxel/s per core
(voxels / in-block CPU seconds summed over workers), the peak resident
memory of any worker, and the scores of the result against the sample's
ground truth (`make bench` ingests it first), so that speed and accuracy
are read together. Design target: >= 1 Mvoxel/s per core.

It also prints the graph step's store time per block: each block's edges,
read back from the run's store, written again as its worker wrote them (a
replace, so the graph stays as it was). With --one-block, each
partitioner runs again in one block over the whole sample on the same
affinities, and the ARAND between the two segmentations is printed: how
much the block-wise result depends on the blocks.
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


def warm_kernels() -> None:
    """Compile the workers' numba kernels once, here, into their on-disk
    cache: on a fresh clone or after a change to a kernel, every worker
    would otherwise compile them in its first block (about 6 CPU s each),
    and compiling is not the rate."""
    import numpy as np

    from pipeline.kernels.graph_mutex import mutex_lut
    from pipeline.kernels.lut import FragmentIndex
    from pipeline.kernels.mutex import mutex_watershed
    from pipeline.kernels.rag import edge_means, linked_edges
    from pipeline.kernels.watershed import epsilon_agglomerate, merge_history, relabel_consecutive

    affs = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 6)).astype(np.uint8)
    labels, _ = relabel_consecutive(epsilon_agglomerate(affs, None, 0.1, "hist_quant_50"))
    for scoring in ("hist_quant_50", "mean"):
        uv, _ = merge_history(affs, labels, scoring)
    edge_means(labels, affs, [(-1, 0, 0)], uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64))
    # the mutex path's: its fragments, its region graph, and the master's graph mutex watershed
    mutex_watershed(affs, [(-1, 0, 0), (0, -1, 0), (0, 0, -1)], [0.5] * 3, [None, None, [1, 3, 3]])
    linked_edges(labels, affs, [(-1, 0, 0), (0, 0, -3)])
    ids = np.array([1, 2, 3], dtype=np.uint64)
    mutex_lut(FragmentIndex.from_ids(ids, 10, 1), [(ids[:2], ids[1:], np.array([5, -3], dtype=np.int16))])


# the edge attributes each partitioner's graph step writes
ATTRIBUTES = {"waterz": ["merge_score", "linked", "affinities"], "mutex_3d": ["linked", "affinities", "pairs"]}
# the mutex path's settings: the methods notes' split (the nearest
# neighbours attract, the long-range offsets repel) and strides of 1 3 3 on
# the long-range edges
MUTEX = {"biases": [0.0] * 3 + [1.0] * 9, "long_range_stride": [1, 3, 3]}


def store_time_per_block(run: Path, partition: str) -> tuple[float, float]:
    """Seconds and edges per graph block of `store.write_edges`."""
    import numpy as np

    from pipeline.orchestration.run_layout import RunDir
    from pipeline.storage.graph_store import open_store

    directory = RunDir(run)
    blocks = range(int(np.prod(directory.read_layout().block_grid)))
    with open_store("sqlite", run, directory.run_id()) as store:
        graph = [store.read_edges([b], ATTRIBUTES[partition]) for b in blocks]
        started = time.perf_counter()
        for block, edges in zip(blocks, graph):
            store.write_edges(block, edges)
        seconds = time.perf_counter() - started
    return seconds / len(blocks), sum(map(len, graph)) / len(blocks)


def run_job(run_dir: Path, partition: str, args, voxel: int, affinities: Path | None, block=None) -> dict:
    """The main job over the sample with `partition` in blocks of `block`
    voxels (default --block); from `affinities` (the waterz run's, so both
    paths partition the same ones) or predicted."""
    block = [b * voxel for b in (block or args.block)]
    # about 1/8 of the block as context on each side, as in the design (the
    # mutex path's graph step reaches the longest offset by itself)
    config = {
        "run_dir": str(run_dir),
        "raw": str(REPO / "data/fib25_medulla/fib25.zarr/raw"),
        "ground_truth": None if args.ground_truth == "none" else args.ground_truth,
        "predict": {"device": "auto", "output_shape": [40, 128, 128], "workers": 1},
        "postprocess": {"block_shape": block, "context": [max(voxel, b // 8 // voxel * voxel) for b in block],
                        "workers": args.workers},
        "partition": partition,
    }
    if affinities is None:
        config["model"] = {"checkpoint": str(REPO / "models/fib25_mala.pt")}
    else:
        offsets = json.loads((affinities.parent.parent / "layout.json").read_text())["offsets"]
        config["affinities"] = {"dataset": str(affinities), "offsets": offsets}
    if partition == "mutex_3d":
        config["mutex"] = MUTEX
    config_path = run_dir.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2))
    started = time.time()
    subprocess.run([sys.executable, str(REPO / "pipeline/predict.py"), str(config_path)], check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((run_dir / "report.json").read_text())
    report["process_wall_s"] = time.time() - started
    return report


def print_report(report: dict, partition: str, run_dir: Path, args) -> None:
    voxels = report["volume_voxels"]
    steps = report["steps"]
    block_steps = [s for s in steps if s not in ("segments", "evaluate")]
    post = [s for s in block_steps if s != "predict"]
    print(f"\n{partition}: volume {voxels / 1e6:.2f} Mvoxel, block {tuple(args.block)} voxels, "
          f"{steps[post[0]]['blocks']} blocks, {args.workers} workers")
    print(f"{'step':<16}{'cpu s':>9}{'Mvox/s/core':>13}{'wall s':>9}{'peak RSS MB':>13}")
    for step in block_steps:
        s = steps[step]
        rate = voxels / s["cpu_s"] / 1e6 if s["cpu_s"] else float("nan")
        print(f"{step:<16}{s['cpu_s']:>9.2f}{rate:>13.2f}{s['wall_s']:>9.2f}{s['peak_worker_rss_bytes'] / 2**20:>13.0f}")
    cpu = sum(steps[s]["cpu_s"] for s in post)
    peak = max(steps[s]["peak_worker_rss_bytes"] for s in post)
    print(f"{' + '.join(post)}: {voxels / cpu / 1e6:.2f} Mvoxel/s per core ({cpu:.2f} CPU s); "
          f"peak worker memory {peak / 2**20:.0f} MB")
    print(f"segments (look-up tables, master): {steps['segments']['wall_s']:.2f} s for {report['graph']['edges']} edges")
    seconds, edges = store_time_per_block(run_dir, partition)
    print(f"graph store: {seconds * 1e3:.1f} ms per block ({edges:.0f} edges, {edges / seconds / 1e6:.2f} M edges/s)")
    for row in report.get("scores", []):
        print(f"threshold {row['threshold']:.2f}: VOI {row['voi']:.4f} (split {row['voi_split']:.4f}, "
              f"merge {row['voi_merge']:.4f}), ARAND {row['arand']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="post-processing workers (default 2)")
    parser.add_argument("--block", type=int, nargs=3, default=(80, 125, 125), metavar=("Z", "Y", "X"),
                        help="post-processing block in voxels (default 80 125 125: 8 blocks)")
    parser.add_argument("--ground-truth", default=str(REPO / "runs/fib25.zarr/labels"),
                        help="labels to score against (default: the one make ingests); 'none' to skip")
    parser.add_argument("--run-dir", default=str(REPO / "runs/bench_postprocess"), help="scratch run directory (replaced)")
    parser.add_argument("--partition", choices=("both", "waterz", "mutex_3d"), default="both",
                        help="the partitioners to run (default both: mutex_3d on waterz's predicted affinities)")
    parser.add_argument("--one-block", action="store_true",
                        help="then each partitioner again in one block over the whole sample, on the same "
                             "affinities, and the ARAND between the block-wise and the one-block segmentation")
    args = parser.parse_args()

    out = Path(args.run_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    warm_kernels()
    affinities = None
    for partition in ("waterz", "mutex_3d") if args.partition == "both" else (args.partition,):
        run_dir = out / partition
        report = run_job(run_dir, partition, args, 10, affinities)
        print_report(report, partition, run_dir, args)
        affinities = affinities or run_dir / "volumes.zarr" / "affs"
        if args.one_block:
            compare_one_block(run_dir, partition, args, affinities)


def compare_one_block(run_dir: Path, partition: str, args, affinities: Path) -> None:
    """The ARAND between `run_dir`'s segmentation and the same job's in one
    block over the whole sample (waterz: at its relabel threshold)."""
    import numpy as np
    from funlib.persistence import open_ds

    from pipeline.evaluation.metrics import evaluate_arrays

    whole = open_ds(affinities).shape[1:]
    one = run_dir.with_name(run_dir.name + "_one_block")
    run_job(one, partition, args, 10, affinities, block=whole)
    blockwise, single = (open_ds(r / "volumes.zarr" / "segmentation") for r in (run_dir, one))
    arand = evaluate_arrays(np.asarray(blockwise[blockwise.roi]), np.asarray(single[single.roi]))["arand"]
    print(f"{partition}: one block of {tuple(whole)} voxels against the block-wise run: ARAND {arand:.4f}")


if __name__ == "__main__":
    main()
