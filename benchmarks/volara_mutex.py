"""affseg's mutex_3d path beside volara's mutex-watershed chain on the same
given affinities (issue 20): whole-process CPU, wall time and VOI / ARAND of both against the sample's ground truth.

    python benchmarks/volara_mutex.py --volara-python PATH [AFFS] [--workers N]
    (AFFS: runs/bench_postprocess/waterz/volumes.zarr/affs, the bundled
    model's affinities that `make bench` predicts)

volara (PyPI `volara`, e11 bio) needs daisy < 2 and funlib.persistence 0.7,
so it lives in a virtual environment of its own, outside the project:

    python3 -m venv /tmp/volara-venv && /tmp/volara-venv/bin/pip install volara==1.0.5

The same settings on both sides: blocks of 80 x 125 x 125 voxels, a context
of 10 x 15 x 15 (affseg's graph step reaches the longest offset by itself;
volara's AffAgglom gets that reach as its context), the methods notes'
split biases (the nearest neighbours attract, the long-range offsets repel:
affseg `mutex.biases` 0 and 1, volara `bias` 0 and -1, since volara adds
its bias where affseg subtracts), long-range stride 1 3 3; the graph
mutex watershed over the mean affinity of each class of offsets between
two fragments, one edge per class (volara `AffAgglom.scores` and
`GraphMWS.weights` (1, 0) and (1, -1); affseg's mutex_graph and segments),
SQLite on both sides. Each chain runs twice: with N local worker
processes, and in one process (affseg's `launcher.kind: "in_process"`,
volara's `run_blockwise(multiprocessing=False)`), since on a sample this
small a worker process's start (its imports) is a large part of the CPU.
affseg also removes segments below
`mutex.min_size` (200 voxels, its default) by growing the others over them;
volara has no such step. Each side runs as a child process whose CPU time
(user + system, its workers included) is read from the kernel when it
ends.

The volara side is this file run by the volara interpreter with
`--volara-side`; it imports nothing of affseg's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = (80, 125, 125)
CONTEXT = (10, 15, 15)
STRIDE = (1, 3, 3)


def nearest(offset) -> bool:
    return sum(abs(o) for o in offset) == 1


def volara_side(affs: str, offsets: list, out: Path, workers: int) -> None:
    """workers 0: volara's serial mode, every block in this process."""
    """volara's chain: ExtractFrags -> AffAgglom -> GraphMWS -> Relabel."""
    from funlib.persistence import open_ds
    from volara.blockwise import AffAgglom, ExtractFrags, GraphMWS, Relabel
    from volara.datasets import Affs, Labels
    from volara.dbs import SQLite
    from volara.lut import LUT

    volume = open_ds(affs)
    reach = tuple(max(abs(o[d]) for o in offsets) for d in range(3))
    db = SQLite(path=out / "graph.db", edge_attrs={"adjacent": "float", "long_range": "float"})
    affs_data = Affs(store=affs, neighborhood=offsets)
    fragments = Labels(store=out / "volara.zarr" / "fragments")
    lut = LUT(path=str(out / "lut"))  # a str: volara appends .npz to str paths only
    extract = ExtractFrags(
        db=db, affs_data=affs_data, frags_data=fragments, block_size=BLOCK, context=CONTEXT,
        bias=[0.0 if nearest(o) else -1.0 for o in offsets],
        strides=[(1, 1, 1) if nearest(o) else STRIDE for o in offsets], num_workers=max(workers, 1))
    agglom = AffAgglom(
        db=db, affs_data=affs_data, frags_data=fragments, block_size=BLOCK,
        context=tuple(max(c, r) for c, r in zip(CONTEXT, reach)),
        scores={"adjacent": [o for o in offsets if nearest(o)], "long_range": [o for o in offsets if not nearest(o)]},
        num_workers=max(workers, 1))
    mws = GraphMWS(db=db, lut=lut, weights={"adjacent": (1.0, 0.0), "long_range": (1.0, -1.0)},
                   roi=(volume.roi.offset, volume.roi.shape))
    relabel = Relabel(frags_data=fragments, seg_data=Labels(store=out / "volara.zarr" / "segmentation"), lut=lut,
                      block_size=BLOCK, num_workers=max(workers, 1))
    if workers:
        (extract + agglom + mws + relabel).run_blockwise(multiprocessing=True)
    else:
        # in serial mode volara sets Relabel up (reading the look-up table)
        # before GraphMWS has written it: the relabelling runs after
        (extract + agglom + mws).run_blockwise(multiprocessing=False)
        relabel.run_blockwise(multiprocessing=False)


def affseg_side(affs: Path, offsets: list, out: Path, workers: int) -> Path:
    """affseg's main job from the given affinities, partition mutex_3d;
    workers 0: launcher in_process, every block in the master."""
    volume = json.loads((affs / ".zattrs").read_text())
    voxel = volume["voxel_size"]
    name = f"affseg_{workers}"
    config = {
        "run_dir": str(out / name),
        "raw": str(REPO / "data/fib25_medulla/fib25.zarr/raw"),
        "ground_truth": None,
        "affinities": {"dataset": str(affs), "offsets": offsets},
        "partition": "mutex_3d",
        "mutex": {"biases": [0.0 if nearest(o) else 1.0 for o in offsets], "long_range_stride": list(STRIDE)},
        "postprocess": {"block_shape": [b * v for b, v in zip(BLOCK, voxel)],
                        "context": [c * v for c, v in zip(CONTEXT, voxel)], "workers": max(workers, 1)},
        "launcher": {"kind": "local" if workers else "in_process"},
    }
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    subprocess.run([sys.executable, str(REPO / "pipeline/predict.py"), str(config_path)], check=True,
                   stdout=subprocess.DEVNULL)
    return out / name / "volumes.zarr" / "segmentation"


def measured(run):
    """(what `run` returns, CPU s of the processes it starts, wall s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, cpu, wall


def score(segmentation: Path, ground_truth: Path) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np
    from funlib.persistence import open_ds

    from pipeline.evaluation.metrics import Contingency, scores

    truth = open_ds(ground_truth)
    if segmentation.suffix == ".npy":  # the whole volume, as the ground truth's
        seg = np.load(segmentation)
    else:
        volume = open_ds(segmentation)
        seg = np.asarray(volume[volume.roi])
    labels = np.asarray(truth[truth.roi])
    if seg.shape != labels.shape:
        sys.exit(f"volara_mutex: a segmentation of {seg.shape} voxels against ground truth of {labels.shape}")
    table = Contingency()
    table.add(seg.astype(np.uint64), labels.astype(np.uint64))
    return scores(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("affs", nargs="?", default=str(REPO / "runs/bench_postprocess/waterz/volumes.zarr/affs"))
    parser.add_argument("--volara-python", help="the interpreter of volara's virtual environment")
    parser.add_argument("--workers", type=int, default=2, help="local workers on both sides (default 2)")
    parser.add_argument("--ground-truth", default=str(REPO / "runs/fib25.zarr/labels"))
    parser.add_argument("--out", default=str(REPO / "runs/volara_mutex"), help="scratch directory (replaced)")
    parser.add_argument("--volara-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    affs = Path(args.affs).resolve()
    out = Path(args.out).resolve()
    offsets = json.loads((affs.parent.parent / "layout.json").read_text())["offsets"] if not args.volara_side else None
    if args.volara_side:
        return volara_side(str(affs), json.loads((out / "offsets.json").read_text()), out, args.workers)
    if not args.volara_python:
        sys.exit("volara_mutex: --volara-python PATH is required (see --help for the install line)")
    if not affs.exists():
        sys.exit(f"volara_mutex: {affs} does not exist: run `make bench` first, or name affinities")
    if args.workers < 1:
        sys.exit("volara_mutex: --workers must be at least 1 (the one-process rows are always run)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = {}
    # each chain with its worker processes, and in one process (affseg's
    # in_process launcher, volara's serial mode)
    for workers in (args.workers, 0):
        label = f"{args.workers} workers" if workers else "one process"
        seg, cpu, wall = measured(lambda: affseg_side(affs, offsets, out, workers))
        rows[f"affseg, {label}"] = (cpu, wall, score(seg, Path(args.ground_truth)))
        side = out / f"volara_{workers}"
        side.mkdir()
        (side / "offsets.json").write_text(json.dumps(offsets))
        _, cpu, wall = measured(lambda: subprocess.run(
            [args.volara_python, __file__, str(affs), "--volara-side", "--out", str(side), "--workers", str(workers)],
            check=True, cwd=side, stdout=subprocess.DEVNULL))
        # volara writes zarr v3, which affseg's zarr 2 does not read: its
        # interpreter exports the segmentation, outside the measured run
        subprocess.run([args.volara_python, "-c", "import sys, numpy, zarr; "
                        "numpy.save(sys.argv[2], zarr.open_array(sys.argv[1], mode='r')[:])",
                        str(side / "volara.zarr" / "segmentation"), str(side / "segmentation.npy")], check=True)
        rows[f"volara, {label}"] = (cpu, wall, score(side / "segmentation.npy", Path(args.ground_truth)))
    print(f"{affs}: blocks {BLOCK}, context {CONTEXT} voxels")
    print(f"{'chain':<24}{'CPU s':>8}{'wall s':>8}{'VOI':>8}{'split':>8}{'merge':>8}{'ARAND':>8}")
    for name, (cpu, wall, s) in rows.items():
        print(f"{name:<24}{cpu:>8.1f}{wall:>8.1f}{s['voi']:>8.3f}{s['voi_split']:>8.3f}"
              f"{s['voi_merge']:>8.3f}{s['arand']:>8.3f}")
    volara = rows[f"volara, {args.workers} workers"][0]
    for name, (cpu, _, _) in rows.items():
        if name.startswith("affseg"):
            print(f"{name} uses {cpu / volara:.3f} of volara's CPU with {args.workers} workers "
                  f"and {cpu / rows['volara, one process'][0]:.3f} of volara's in one process")


if __name__ == "__main__":
    main()
