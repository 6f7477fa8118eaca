"""The loop every worker process runs: set up once, then process blocks.

Each step module in `workers/` exposes `setup(run) -> context manager that
yields process_block(block)` (the volara pattern: load the model, open
volumes and connect to the store once per worker, not once per block) and a
`main()` that hands `setup` to `run_worker`. Launchers start workers as
`python -m workers.STEP RUN_DIR/config.json`; daisy passes the scheduler's
address in the DAISY_CONTEXT environment variable.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import daisy

from pipeline.config import RunConfig, load_json
from pipeline.orchestration.run_layout import RunDir, RunLayout

ProcessBlock = Callable[[daisy.Block], None]


@dataclass(frozen=True)
class WorkerRun:
    config: RunConfig
    layout: RunLayout
    run_dir: RunDir
    worker_id: int = 0


def load_run(config_path: str | Path, worker_id: int = 0) -> WorkerRun:
    config = RunConfig(**load_json(config_path))
    run_dir = RunDir(Path(config.run_dir))
    return WorkerRun(config, run_dir.read_layout(), run_dir, worker_id)


def run_worker(setup: Callable[[WorkerRun], AbstractContextManager[ProcessBlock]], step: str) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m workers.{step}",
        description=f"Block-wise {step} worker; started by pipeline/predict.py through a launcher.",
    )
    parser.add_argument("config", help="RUN_DIR/config.json written by pipeline/predict.py")
    args = parser.parse_args()
    client = daisy.Client()
    run = load_run(args.config, client.worker_id)
    with setup(run) as process_block:
        while True:
            with client.acquire_block() as block:
                if block is None:
                    break
                process_block(block)
