"""One master per run directory.

A second master on the same run directory would schedule the same blocks
twice and race the first one's look-up tables and relabelling. The master
holds a POSIX lock (`fcntl.lockf`, which NFS v4 and Lustre also honour) on
`RUN_DIR/master.lock` for its whole life; the file says who holds it. The
kernel (or the file server) drops the lock when the holder dies, however it
dies, so a stale lock from a killed master is taken over without a check of
PIDs or hosts, which could not be trusted across machines anyway.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError


@contextmanager
def master_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(path)
            raise UserError(
                f"run_dir {path.parent} is in use by the master on {holder.get('host', '?')}, PID "
                f"{holder.get('pid', '?')}, since {holder.get('since', '?')}; wait for it to finish or stop it"
            ) from e
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
