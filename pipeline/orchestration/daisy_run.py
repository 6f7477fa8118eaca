"""Running daisy tasks and master-side steps of a run: their report
entries, their progress log records, and the one-line cause of a failure."""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import daisy

from pipeline.errors import RunFailed
from pipeline.orchestration.in_process import BlockFailed, InProcessStep, run_in_process
from pipeline.orchestration.launchers import failed_workers
from pipeline.orchestration.progress import ProgressLog


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def _worker_error(logs: Path, step: str) -> str | None:
    """The last exception a worker of `step` logged: daisy only knows that
    the worker command failed, the cause is in the worker's stderr."""
    found = None
    for path in sorted((logs / step).glob("*.err"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text(errors="replace").splitlines():
            if _ERROR_LINE.match(line) and not line.startswith("subprocess.CalledProcessError"):
                found = line.strip()
    return found


@contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Native writes to file descriptor 2 go to `path`, Python's stay on the
    terminal. daisy's scheduler (Rust) logs a warning for every worker that
    died or failed, with the Python traceback of the exception that told it
    so: on a run that recovers and exits 0 that is noise, and when it does
    not recover, the run's failure line names the cause. The log keeps
    them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    python_stderr = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, closefd=False, errors=python_stderr.errors)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        os.close(terminal)
        sys.stderr = python_stderr


def run_daisy(pipeline, progress: ProgressLog, report: dict, logs: Path) -> None:
    tasks = pipeline.tasks if isinstance(pipeline, daisy.Pipeline) else [pipeline]
    steps = [task.task_id for task in tasks]
    failed_before = {step: failed_workers(logs, step) for step in steps}
    with native_stderr_to(logs / "daisy.log"):
        # the launcher kind made the process functions: block functions of
        # this process (in_process) or worker commands
        if all(isinstance(task.process_function, InProcessStep) for task in tasks):
            try:
                states, per_task = run_in_process(tasks, pipeline, progress, logs)
            except BlockFailed as e:
                raise RunFailed(str(e)) from e
        else:
            server = daisy.Server()
            states = server.run_blockwise(pipeline, progress=progress, summary=False)
            per_task = (server.last_tracking_summary or {}).get("per_task", {})
    failed = []
    for step, state in states.items():
        blocks = int(state.completed_count)
        fresh = blocks - int(state.skipped_count)
        wall = progress.wall_time(step)
        report["steps"][step] = {
            "blocks": int(state.total_block_count),
            "completed": blocks,
            "skipped": int(state.skipped_count),
            "failed": int(state.failed_count),
            "orphaned": int(state.orphaned_count),
            # worker processes of this start that died or failed, each
            # replaced by daisy while blocks remained (the launchers' record:
            # daisy's own count missed workers killed by a signal)
            "worker_restarts": failed_workers(logs, step) - failed_before.get(step, 0),
            "wall_s": round(wall, 2),
            "voxels_per_s": round(fresh * progress.voxels_per_block[step] / wall, 1) if wall > 0 else None,
            # in-block CPU seconds summed over workers: throughput per core
            # is voxels / cpu_s, whatever the number of workers
            "cpu_s": round(float(per_task.get(step, {}).get("total_cpu_secs", 0.0)), 2),
            "peak_worker_rss_bytes": int(per_task.get(step, {}).get("max_peak_rss_bytes", 0)),
        }
        if blocks != state.total_block_count:
            if state.timeout_reclaim_count:
                # the worker was stopped mid-block: its log holds no error
                cause = (f"{state.timeout_reclaim_count} block attempt(s) timed out after {state.timeout_secs:g} s; "
                         f"raise block_timeout_s if blocks are this slow")
            else:
                cause = _worker_error(logs, step)
            failed.append(
                f"{step}: {state.total_block_count - blocks} of {state.total_block_count} blocks did not finish"
                + (f" ({cause})" if cause else "")
            )
    if failed:
        raise RunFailed("; ".join(failed))


def report_finished(step: str, blocks: int, progress: ProgressLog, report: dict) -> None:
    """A block-wise step whose blocks were all done before this start, not
    given to daisy: its report entry and progress records, as daisy's run
    of it would have made them (every block skipped)."""
    counts = {"total": blocks, "completed": blocks, "skipped": blocks, "failed": 0, "processing": 0, "orphaned": 0,
              "voxels_per_block": progress.voxels_per_block.get(step, 0)}
    for event in ("start", "finish"):
        progress.log_step(step, event, **counts)
    report["steps"][step] = {"blocks": blocks, "completed": blocks, "skipped": blocks, "failed": 0, "orphaned": 0,
                             "worker_restarts": 0, "wall_s": 0.0, "voxels_per_s": None, "cpu_s": 0.0,
                             "peak_worker_rss_bytes": 0}


def master_step(step: str, progress: ProgressLog, report: dict, function):
    progress.log_step(step, "start")
    started = time.time()
    try:
        result = function()
    except RunFailed as e:  # a lost store: the failure line names the step
        raise RunFailed(f"{step}: {e}") from e
    wall = time.time() - started
    report["steps"][step] = {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    progress.log_step(step, "finish", wall_s=round(wall, 2))
    return result
