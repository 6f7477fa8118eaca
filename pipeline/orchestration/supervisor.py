"""The master runs as a child of a small supervisor, which explains in one
line a master that dies of a signal.

Some deaths give no message of their own: when run_dir's file system fills
up, the scheduler dies of SIGBUS inside daisy's native code (it maps files
of run_dir into memory), and a master killed by the kernel for lack of
memory just vanishes. The supervisor sees the signal and says what it most
likely means and what to do. It forwards SIGTERM and SIGHUP to the master;
Ctrl-C reaches the master straight from the terminal (same process group),
so the supervisor ignores SIGINT and waits for the master to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.errors import EXIT_FAILED

CHILD = "AFFSEG_MASTER_CHILD"


def _free_bytes(path: Path) -> int:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def explain(signal_number: int, run_dir: Path) -> str:
    name = signal.Signals(signal_number).name
    if signal_number == signal.SIGBUS:
        return (f"the master died of {name}, which happens when the file system of {run_dir} is full "
                f"({_free_bytes(run_dir) / 2**20:.0f} MiB free now); free space and re-run the same command to resume")
    if signal_number == signal.SIGKILL:
        return (f"the master was killed ({name}); if nobody killed it, this machine ran out of memory. "
                f"Re-run the same command to resume")
    return f"the master died of {name}; re-run the same command to resume"


def supervise(run_dir: Path) -> int | None:
    """In the supervisor: run this same command as the master and return its
    exit code. In the master: None (go on)."""
    if os.environ.get(CHILD) == "1":
        return None
    master = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, CHILD: "1"})
    for forwarded in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(forwarded, lambda number, frame: master.send_signal(number))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = master.wait()
    if code >= 0:
        return code
    # on a line of its own: the master may have died in the middle of one
    # (a progress bar)
    print(f"\naffseg: run failed: {explain(-code, run_dir)}", file=sys.stderr)
    return EXIT_FAILED
