"""Running daisy tasks and master-side steps of a run: their report
entries, their progress log records, and the one-line cause of a failure."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import daisy

from pipeline.orchestration.progress import ProgressLog


class RunFailed(Exception):
    pass


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


def run_daisy(pipeline, progress: ProgressLog, report: dict, logs: Path) -> None:
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
            "worker_restarts": int(state.worker_restart_count),
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


def master_step(step: str, progress: ProgressLog, report: dict, function):
    progress.log_step(step, "start")
    started = time.time()
    result = function()
    wall = time.time() - started
    report["steps"][step] = {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    progress.log_step(step, "finish", wall_s=round(wall, 2))
    return result
