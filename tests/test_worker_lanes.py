"""A worker's lanes (workers/loop.py): blocks processed concurrently, each
released only once processed, a failure failing its block and stopping the
worker; and, with daisy's real scheduler, no block lost at the end of a task."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import daisy
import pytest
from funlib.geometry import Roi

from workers.loop import run_lanes, scheduler_connection


def fake_scheduler(n_blocks: int, events: list):
    """An acquirer handing out 0..n_blocks-1 and recording what happened to
    each: acquired, released (done) or failed."""
    queue = iter(range(n_blocks))
    lock = threading.Lock()

    @contextmanager
    def acquire():
        with lock:
            block = next(queue, None)
        if block is None:
            yield None
            return
        events.append(("acquired", block))
        try:
            yield block
        except BaseException:
            events.append(("failed", block))
            raise
        events.append(("released", block))

    return acquire


def test_lanes_overlap_and_release_each_block_only_after_processing_it():
    events = []
    # the first two blocks must be in process at the same time, or the
    # barrier times out and the lane fails
    both_in = threading.Barrier(2, timeout=10)

    def process_block(block):
        events.append(("started", block))
        if block < 2:
            both_in.wait()
        time.sleep(0.01)
        events.append(("processed", block))

    acquire = fake_scheduler(6, events)
    run_lanes(process_block, 2, lambda: acquire)
    for block in range(6):
        assert events.index(("processed", block)) < events.index(("released", block))
    assert not [e for e in events if e[0] == "failed"]


def test_a_failing_block_is_reported_failed_stops_the_other_lane_and_is_raised():
    events = []

    def process_block(block):
        if block == 1:
            raise RuntimeError("bad block")
        time.sleep(0.05)

    acquire = fake_scheduler(20, events)
    with pytest.raises(RuntimeError, match="bad block"):
        run_lanes(process_block, 2, lambda: acquire)
    assert ("failed", 1) in events
    # the other lane finishes the block it holds and takes no more
    assert len([e for e in events if e[0] == "released"]) <= 2


def _lanes_worker(marks: Path) -> None:
    def process_block(block):
        time.sleep(0.05)
        (marks / str(block.block_id[1])).touch()

    run_lanes(process_block, 2, scheduler_connection)


def test_two_lanes_of_one_daisy_worker_finish_every_block(tmp_path, monkeypatch):
    """A lane that asks for a block while the worker's other lane still
    holds the last one must not make daisy count that block lost."""
    monkeypatch.chdir(tmp_path)  # daisy's worker logs
    marks = tmp_path / "marks"
    marks.mkdir()
    task = daisy.Task(
        "lanes", Roi((0,), (70,)), Roi((0,), (10,)), Roi((0,), (10,)),
        process_function=lambda: _lanes_worker(marks), read_write_conflict=False, max_workers=1, max_retries=0,
    )
    assert daisy.run_blockwise([task], progress=False, summary=False)
    assert sorted(int(p.name) for p in marks.iterdir()) == list(range(7))
