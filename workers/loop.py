"""The loop every worker process runs: set up once, then process blocks.

Each step module in `workers/` exposes `setup(run) -> context manager that
yields process_block(block)` (the volara pattern: load the model, open
volumes and connect to the store once per worker, not once per block) and a
`main()` that hands `setup` to `run_worker`. Launchers start workers as
`python -m workers.STEP RUN_DIR/config.json`; daisy passes the scheduler's
address in the DAISY_CONTEXT environment variable.

A step may ask for several lanes: threads of one worker, each with its own
connection to the scheduler, taking and releasing its own blocks. The
predict step uses two or three, so that blocks are read and written while
the model works on another (`predict_lanes` in workers/predict.py).
"""

from __future__ import annotations

import argparse
import threading
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import daisy
import numpy as np

from pipeline.config import RunConfig, load_json
from pipeline.orchestration.run_layout import RunDir, RunLayout

ProcessBlock = Callable[[daisy.Block], None]
# daisy.Client.acquire_block: a context manager yielding the next block, or
# None when there is none left, that reports the block done when it exits
# cleanly and failed when it exits with an exception
Acquire = Callable[[], AbstractContextManager["daisy.Block | None"]]


@dataclass(frozen=True)
class WorkerRun:
    config: RunConfig
    layout: RunLayout
    run_dir: RunDir
    worker_id: int = 0


def sample_block(offsets) -> tuple[np.ndarray, np.ndarray]:
    """A small random block that every offset fits in: uint8 affinities
    (C, Z, Y, X) of `offsets` and labels 1..n (uint64, as
    `relabel_consecutive` gives them) of 2 x 2 x 2 cubes. Each worker's setup
    runs its step's kernels on it once, so that numba loads them from its
    cache there, once per worker as a model is loaded (0.1 to 0.4 CPU s a
    step), and not inside the worker's first block."""
    reach = np.abs(np.asarray(offsets, dtype=np.int64).reshape(-1, 3)).max(axis=0) + 2
    affs = np.random.default_rng(0).integers(0, 256, (len(offsets), *reach), dtype=np.uint8)
    labels = np.ravel_multi_index(tuple(np.indices(reach) // 2), tuple((reach + 1) // 2)).astype(np.uint64) + np.uint64(1)
    return affs, labels


def load_run(config_path: str | Path, worker_id: int = 0) -> WorkerRun:
    config = RunConfig(**load_json(config_path))
    run_dir = RunDir(Path(config.run_dir))
    return WorkerRun(config, run_dir.read_layout(), run_dir, worker_id)


def _without_tracebacks(error: BaseException) -> BaseException:
    """`error`, and the exceptions it chains, stripped of their tracebacks:
    their frames hold a lane's daisy connection, which must not be freed on
    another thread (its lane prints the traceback first)."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            pending += [e.__cause__, e.__context__]
    return error


def run_lanes(process_block: ProcessBlock, lanes: int, connect: Callable[[], Acquire]) -> None:
    """`process_block` on every block the scheduler hands out, in `lanes`
    lanes: the calling thread and `lanes - 1` more, so `process_block` must
    be thread-safe when `lanes > 1` (one lane keeps a step's SQLite
    connection on the thread that opened it).

    Each lane calls `connect` for its own acquirer: daisy's client must stay
    on the thread that made it, and a connection that asks while it still
    holds a block, with no other block free, is answered None and its held
    block counted lost. A block is released by its lane once `process_block`
    returned, so it is reported done only after its output is written. A
    lane's failure fails its block, stops the other lanes from taking new
    ones, and is raised here."""
    failures: list[BaseException] = []

    def lane() -> None:
        try:
            acquire = connect()
            while not failures:
                with acquire() as block:
                    if block is None:
                        return
                    process_block(block)
        except BaseException as e:  # noqa: BLE001 - raised again by the calling thread
            traceback.print_exc()
            failures.append(_without_tracebacks(e))

    threads = [threading.Thread(target=lane, name=f"lane-{k}") for k in range(1, lanes)]
    for thread in threads:
        thread.start()
    lane()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def scheduler_connection() -> Acquire:
    """A new connection to the scheduler named by DAISY_CONTEXT."""
    return daisy.Client().acquire_block


def run_worker(setup: Callable[[WorkerRun], AbstractContextManager[ProcessBlock]], step: str,
               lanes: Callable[[WorkerRun], int] = lambda run: 1) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m workers.{step}",
        description=f"Block-wise {step} worker; started by pipeline/predict.py through a launcher.",
    )
    parser.add_argument("config", help="RUN_DIR/config.json written by pipeline/predict.py")
    args = parser.parse_args()
    run = load_run(args.config, int(daisy.Context.from_env()["worker_id"]))
    with setup(run) as process_block:
        run_lanes(process_block, lanes(run), scheduler_connection)
