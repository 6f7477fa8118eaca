"""What the integrity and identity checks cost when a run of the Kasthuri15
layout starts (or resumes), measured on a synthetic run directory.

    python benchmarks/resume_check.py [--dir DIR] [--keep]

Builds (once; `--keep` leaves it for the next call) a run directory with
the Kasthuri15 block layout of configs/cluster_kasthuri15.json: 10747 x
12895 x 1850 voxels of 6 x 6 x 30 nm, predict blocks of 24 x 192 x 192
voxels, post-processing blocks of 48 x 384 x 384, the chunks those blocks
give (affinities 12 x 24 x 64 x 64, fragments and segmentation 48 x 64 x
64, raw 64^3), every chunk an empty file, and the done markers of a
finished run written by daisy itself. Then times, with the file system's
cache warm and (as root, where /proc/sys/vm/drop_caches can be written)
cold:

- the done-marker check of a resumed run (pipeline/orchestration/resume.py,
  `keep_done_blocks`): every chunk of affs, fragments and segmentation
  listed, every done block of predict, fragments, agglomerate and relabel
  checked against its chunks and the blocks it read;
- the same after one fragments chunk was deleted (what it then clears);
- raw's completeness check (a listing) and its identity digest (one stat
  per chunk file: names, sizes, modification times).
Figures are of this machine's local disk; a network file system lists and
stats more slowly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import daisy  # noqa: E402
import numpy as np  # noqa: E402
from funlib.geometry import Coordinate, Roi  # noqa: E402
from funlib.persistence import open_ds  # noqa: E402

from pipeline.orchestration.resume import keep_done_blocks  # noqa: E402
from pipeline.orchestration.run_layout import RunDir, RunLayout, check_complete  # noqa: E402
from pipeline.orchestration.tasks import step_geometry  # noqa: E402
from pipeline.storage.volumes import ChunkFiles, prepare_volume  # noqa: E402

VOXEL = Coordinate(30, 6, 6)
SHAPE = Coordinate(1850, 12895, 10747)
OFFSETS = tuple((d * (a == 0), d * (a == 1), d * (a == 2)) for d in (-1, -3, -9, -27) for a in range(3))
STEPS = ("predict", "fragments", "agglomerate", "relabel")


def kasthuri15_layout() -> RunLayout:
    return RunLayout(
        voxel_size=VOXEL,
        roi=Roi((0, 0, 0), SHAPE * VOXEL),
        offsets=OFFSETS,
        predict_output=Coordinate(24, 192, 192) * VOXEL,
        predict_context=Coordinate(20, 20, 20) * VOXEL,
        block_shape=Coordinate(48, 384, 384) * VOXEL,
        context=Coordinate(8, 48, 48) * VOXEL,
        partition="waterz",
    )


def touch_chunks(path: Path) -> int:
    """An empty file for every chunk of the dataset at `path`."""
    files = ChunkFiles.of(open_ds(path))
    count = 0
    prefixes = [range(n) for n in files.grid[:-1]]
    for index in np.ndindex(*[len(r) for r in prefixes]):
        directory = path.joinpath(*map(str, index))
        directory.mkdir(parents=True, exist_ok=True)
        for last in range(files.grid[-1]):
            os.close(os.open(directory / str(last), os.O_CREAT | os.O_WRONLY, 0o644))
        count += files.grid[-1]
    return count


def build(root: Path, layout: RunLayout) -> dict:
    run_dir = RunDir(root / "run")
    counts = {}
    raw = root / "raw.zarr" / "raw"
    prepare_volume(raw.parent, "raw", layout.roi, VOXEL, "uint8", Coordinate(64, 64, 64) * VOXEL)
    counts["raw"] = touch_chunks(raw)
    prepare_volume(run_dir.volumes, "affs", layout.roi, VOXEL, "uint8", layout.predict_output, channels=len(OFFSETS))
    counts["affs"] = touch_chunks(run_dir.volumes / "affs")
    for name in ("fragments", "segmentation"):
        prepare_volume(run_dir.volumes, name, layout.roi, VOXEL, "uint64", layout.block_shape)
        counts[name] = touch_chunks(run_dir.volumes / name)
    for step in STEPS:
        total, read, write, fit = step_geometry(layout, step)
        task = daisy.Task(step, total_roi=total, read_roi=read, write_roi=write, process_function=lambda block: None,
                          read_write_conflict=False, fit=fit, max_workers=1, tracking_path=str(run_dir.tracking(step)))
        started = time.perf_counter()
        daisy.run_blockwise([task], multiprocessing=False)
        counts[f"{step} blocks"] = f"{int(np.prod(task.block_grid_shape))} cells, {time.perf_counter() - started:.0f} s in daisy"
    (root / "built").write_text("")
    return counts


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("runs/bench_resume"), help="where the synthetic run lives")
    parser.add_argument("--keep", action="store_true", help="keep it for the next call")
    args = parser.parse_args()
    layout = kasthuri15_layout()
    if not (args.dir / "built").exists():
        shutil.rmtree(args.dir, ignore_errors=True)
        started = time.perf_counter()
        counts = build(args.dir, layout)
        print(f"built {args.dir} in {time.perf_counter() - started:.0f} s: {counts}")
    run_dir = RunDir(args.dir / "run")
    raw = open_ds(args.dir / "raw.zarr" / "raw")
    chunks = sum(int(np.prod(ChunkFiles.of(open_ds(run_dir.volumes / n)).grid)) for n in ("affs", "fragments", "segmentation"))
    print(f"{chunks:,} chunk files of the run's volumes, {int(np.prod(ChunkFiles.of(raw).grid)):,} of raw")

    for cache in ("warm", "cold"):
        if cache == "cold" and not drop_caches():
            print("cold: not measured (dropping the page cache needs root)")
            break
        if cache == "warm":
            keep_done_blocks(layout, run_dir, STEPS, graph_lost=False)
        seconds, redone = timed(lambda: keep_done_blocks(layout, run_dir, STEPS, graph_lost=False))
        print(f"{cache}: done-marker check of a finished run: {seconds:.2f} s, redone {redone or 'nothing'}")
        if cache == "cold":
            drop_caches()
        seconds, _ = timed(lambda: check_complete(raw, layout.roi, "raw"))
        print(f"{cache}: raw completeness (listing): {seconds:.2f} s")
        if cache == "cold":
            drop_caches()
        seconds, _ = timed(lambda: ChunkFiles.of(raw).listing_digest())
        print(f"{cache}: raw identity digest (a stat per chunk): {seconds:.2f} s")

    # one fragments chunk lost: its block, the blocks built on it, and
    # (through the look-up tables) every relabel block are redone
    victim = run_dir.volumes / "fragments" / "20" / "100" / "80"
    victim.unlink()
    seconds, redone = timed(lambda: keep_done_blocks(layout, run_dir, STEPS, graph_lost=False))
    print(f"warm: after deleting fragments chunk 20/100/80: {seconds:.2f} s, redone {redone}")
    os.close(os.open(victim, os.O_CREAT | os.O_WRONLY, 0o644))
    if args.keep:
        # the markers it cleared are set again by a run of daisy over the same grid
        for step, _ in redone.items():
            total, read, write, fit = step_geometry(layout, step)
            daisy.run_blockwise([daisy.Task(step, total_roi=total, read_roi=read, write_roi=write,
                                            process_function=lambda block: None, read_write_conflict=False, fit=fit,
                                            max_workers=1, tracking_path=str(run_dir.tracking(step)))],
                                multiprocessing=False)
    else:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
