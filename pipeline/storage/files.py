"""Small files of a run (records, reports, a block's tables), written so
that a reader never sees half of one."""

from __future__ import annotations

from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` next to `path`, then rename it into place: a rename
    within one directory is atomic, so a reader (a worker, the master, a
    resumed run) sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
