"""Run progress: daisy's tqdm bars on the terminal plus a JSON-lines log in
the run directory that `status.py` reads, during a run and after it.

The observer sits outside the tasks (daisy calls it with task states); the
master-side steps (segments, evaluate) append to the same log through
`log_step`, so the log tells the whole story of every (re)start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# daisy's own bar renderer: the bars look the same as in any daisy run
from daisy._progress import _TqdmObserver

# one JSON line per step at most this often while blocks are flowing
MIN_INTERVAL_S = 1.0


class ProgressLog:
    def __init__(self, path: Path, task_order: list[str], voxels_per_block: dict[str, int], bars: bool = True):
        self.path = path
        self.voxels_per_block = voxels_per_block
        self.bars = _TqdmObserver(task_order=task_order) if bars else None
        self._last_written: dict[str, float] = {}
        self._last_counts: dict[str, tuple] = {}
        self.first_active: dict[str, float] = {}
        self.last_change: dict[str, float] = {}

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_step(self, step: str, event: str, **fields) -> None:
        self.write({"t": time.time(), "event": event, "step": step, **fields})

    def _emit(self, event: str, states) -> None:
        now = time.time()
        for step, state in states.items():
            counts = (
                int(state.completed_count), int(state.skipped_count), int(state.failed_count),
                int(state.processing_count), int(state.orphaned_count),
            )
            if counts != self._last_counts.get(step):
                self.last_change[step] = now
                if state.processing_count or state.completed_count > state.skipped_count:
                    self.first_active.setdefault(step, now)
            due = now - self._last_written.get(step, 0.0) >= MIN_INTERVAL_S
            if event != "progress" or (due and counts != self._last_counts.get(step)):
                self._last_written[step] = now
                self.write(
                    {
                        "t": now, "event": event, "step": step, "total": int(state.total_block_count),
                        "completed": counts[0], "skipped": counts[1], "failed": counts[2],
                        "processing": counts[3], "orphaned": counts[4],
                        "voxels_per_block": self.voxels_per_block.get(step, 0),
                    }
                )
            self._last_counts[step] = counts

    def on_start(self, states) -> None:
        self._emit("start", states)
        if self.bars:
            self.bars.on_start(states)

    def on_progress(self, states) -> None:
        self._emit("progress", states)
        if self.bars:
            self.bars.on_progress(states)

    def on_finish(self, states) -> None:
        self._emit("finish", states)
        if self.bars:
            self.bars.on_finish(states)

    def wall_time(self, step: str) -> float:
        """Seconds from the step's first active block to its last change."""
        if step not in self.first_active:
            return 0.0
        return self.last_change[step] - self.first_active[step]
