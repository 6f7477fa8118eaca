"""Launcher kind "in_process": every block of a run in the master process,
one after another (daisy's serial mode), with no worker processes.

A worker process pays about 1.5 CPU s of imports (funlib.persistence's dask
and xarray, numba) before its first block, and a run starts one per worker
and step: on a sample of a few blocks that is most of the run's CPU (the
bench sample's mutex_3d run: docs/performance.md). In the master the imports
are paid once, each step's worker setup once. It is also the mode for pdb.
What it gives up: parallelism (workers must be 1), daisy's retries and block
timeouts. A block's exception stops the run; the re-run resumes at that
block, as after any failure.

daisy's serial mode calls no progress observer, so the steps here feed the
run's ProgressLog themselves, with states of the counts it reads.

Every daisy worker wrapper imports this module (through launchers.py), so
it imports nothing a wrapper does not load already (numpy: 0.06 s each).
"""

from __future__ import annotations

import importlib
import math
import resource
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import daisy


@dataclass
class SerialState:
    """The counts of a task's state that the progress log and daisy's bars
    read, as daisy's TaskState names them."""

    total_block_count: int
    completed_count: int = 0
    skipped_count: int = 0
    failed_count: int = 0
    processing_count: int = 0
    orphaned_count: int = 0
    pending_count: int = 0
    ready_count: int = 0
    worker_restart_count: int = 0


class BlockFailed(Exception):
    """A block's exception, with the step and block it stopped."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


class InProcessStep:
    """A step's daisy block function in the master process: the step's
    worker setup (`workers.STEP.setup`) is entered at its first block and
    kept for the others, as a worker process keeps it, until close()."""

    def __init__(self, step: str, config_path: str):
        self.step = step
        self.config_path = config_path
        self.cpu_s = 0.0  # in-block CPU, as daisy measures a worker's
        self.state: SerialState | None = None
        self.on_block = lambda: None
        self._held = ExitStack()
        self._process = None

    def __call__(self, block: daisy.Block) -> None:
        try:
            if self._process is None:
                from workers.loop import load_run

                setup = importlib.import_module(f"workers.{self.step}").setup
                self._process = self._held.enter_context(setup(load_run(self.config_path)))
            started = time.process_time()
            self._process(block)
            self.cpu_s += time.process_time() - started
        except Exception as e:
            raise BlockFailed(self.step, f"{self.step}: block {block.block_id[1]} failed ({type(e).__name__}: {e})") from e
        self.state.completed_count += 1
        self.on_block()

    def close(self) -> None:
        self._held.close()


def run_in_process(tasks: list[daisy.Task], pipeline, progress, logs: Path) -> tuple[dict, dict]:
    """Runs `pipeline` (of `tasks`, whose process functions are
    InProcessSteps) in this process; (daisy's task states, per-task CPU
    and peak memory as daisy's tracking summary gives them). A block's
    exception is raised as BlockFailed, its traceback in logs/STEP/in_process.err."""
    steps: list[InProcessStep] = [task.process_function for task in tasks]
    states = {}
    for task, step in zip(tasks, steps):
        step.state = states[task.task_id] = SerialState(math.prod(task.block_grid_shape))
        step.on_block = lambda: progress.on_progress(states)
    progress.on_start(states)
    try:
        with ExitStack() as held:
            for step in steps:
                held.callback(step.close)
            final = daisy.run_blockwise(pipeline, multiprocessing=False, progress=False, return_states=True,
                                        summary=False)
    except BlockFailed as e:
        (logs / e.step).mkdir(parents=True, exist_ok=True)
        with open(logs / e.step / "in_process.err", "a") as log:
            log.write("".join(traceback.format_exception(e.__cause__)))
        raise
    progress.on_finish(final)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return final, {task.task_id: {"total_cpu_secs": step.cpu_s, "max_peak_rss_bytes": peak}
                   for task, step in zip(tasks, steps)}
