"""What a resumed run may keep: a block's done marker stands only while the
data it vouches for is there.

daisy skips a block whose done marker is set, whatever happened to its
output since. A run whose `affs` were deleted to free space would skip
predict and build fragments on the empty dataset that `prepare_volume`
recreates: an all-zero segmentation, exit 0. So before any block runs, the
master checks every done block of every step, in the steps' order:

- its output chunks exist (`ChunkFiles.stored`: the chunk files of each
  output volume listed, one directory read per chunk row, no stat per
  file), and its graph records are in the store (a lost graph loses them all);
- every block of an earlier step that it read is itself kept.

A block that fails either check has its marker cleared, so daisy redoes
it, and so does every later block built on it. Chunks tile the write
blocks (`dividing_chunks`), so a block's chunks are a box of the chunk
grid, and "every block it read" is a box of the earlier step's grid: both
are counted for all blocks at once with summed-area tables.

A chunk that exists but cannot be decoded is not found here (that needs
every byte read); the block that reads it fails with the chunk's dataset
and ROI (`read_roi`), and deleting the chunk makes the next run redo it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from funlib.persistence import open_ds

from pipeline.errors import UserError
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.orchestration.tasks import step_geometry
from pipeline.storage.files import write_atomically
from pipeline.storage.volumes import ChunkFiles

# What each block-wise step's workers read from earlier steps (workers/),
# of the steps its run has: "block" reads the earlier step's output within
# the block's read ROI, "all" reads all of it (relabel's look-up table is
# built from the whole graph). Evaluate is redone whole on every run and
# keeps no markers.
READS = {
    "predict": {},
    "fragments": {"predict": "block"},
    "agglomerate": {"predict": "block", "fragments": "block"},
    "mutex_fragments": {"predict": "block"},
    "mutex_graph": {"predict": "block", "mutex_fragments": "block"},
    "relabel": {"fragments": "all", "agglomerate": "all"},
    "mutex_relabel": {"predict": "block", "mutex_fragments": "all", "mutex_graph": "all"},
    "mutex": {"predict": "block"},
}
# steps whose blocks write graph records (nodes, edges) to the store
GRAPH_STEPS = ("fragments", "agglomerate", "mutex_fragments", "mutex_graph")


def outputs(layout: RunLayout, step: str) -> tuple[str, ...]:
    """The run volumes (in volumes.zarr) that a step's blocks write."""
    if step == "predict":
        return ("affs", *(name for name, _, _ in layout.extras))
    return {"fragments": ("fragments",), "mutex_fragments": ("fragments",), "relabel": ("segmentation",),
            "mutex_relabel": ("segmentation",), "mutex": ("segmentation",)}.get(step, ())


class DoneMarkers:
    """daisy 2.0's done markers of one task: a uint8 zarr v3 array over the
    task's block grid (row-major z, y, x; 1 = done) in uncompressed chunks,
    at RUN_DIR/tracking/STEP/done. Read and cleared here while no daisy
    server runs."""

    def __init__(self, tracking: Path):
        self.directory = tracking / "done"
        meta_path = self.directory / "zarr.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if self.meta is not None:
            codecs = [c["name"] for c in self.meta["codecs"]]
            if self.meta["data_type"] != "uint8" or codecs != ["bytes"]:
                raise UserError(
                    f"run_dir: {meta_path} is not daisy 2.0's done-marker layout (uint8, uncompressed); "
                    f"was the run made with another daisy? delete {tracking} to redo that step"
                )

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None if self.meta is None else tuple(self.meta["shape"])

    def _chunks(self) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        chunk = tuple(self.meta["chunk_grid"]["configuration"]["chunk_shape"])
        grid = [range(-(-s // c)) for s, c in zip(self.shape, chunk)]
        return chunk, list(itertools.product(*grid))

    def _file(self, index: tuple[int, ...]) -> Path:
        separator = self.meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        return self.directory / ("c" + separator + separator.join(str(i) for i in index))

    def read(self) -> np.ndarray:
        """A bool per grid cell: marked done."""
        done = np.zeros(self.shape, dtype=bool)
        chunk, indices = self._chunks()
        for index in indices:
            path = self._file(index)
            if path.exists():
                block = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(chunk)
                window = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunk, self.shape))
                done[window] = block[tuple(slice(0, w.stop - w.start) for w in window)] == 1
        return done

    def clear(self, cells: np.ndarray) -> None:
        """Unmark the cells where `cells` is True."""
        chunk, indices = self._chunks()
        for index in indices:
            window = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunk, self.shape))
            part = cells[window]
            path = self._file(index)
            if not part.any() or not path.exists():
                continue
            block = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(chunk).copy()
            block[tuple(slice(0, n) for n in part.shape)][part] = 0
            write_atomically(path, block.tobytes())


@dataclass(frozen=True)
class Cells:
    """A step's grid cells along the three axes, world units: per axis, the
    begin and end of each cell's write ROI and read ROI, clipped to the
    run's ROI (where every step writes and reads run data)."""

    write_begin: list[np.ndarray]
    write_end: list[np.ndarray]
    read_begin: list[np.ndarray]
    read_end: list[np.ndarray]

    @classmethod
    def of(cls, layout: RunLayout, step: str, shape: tuple[int, ...]) -> Cells:
        total, read, write, _ = step_geometry(layout, step)
        lo, hi = layout.roi.begin, layout.roi.end
        wb, we, rb, re = [], [], [], []
        for a, n in enumerate(shape):
            # daisy's cell of a block is (write begin - total begin) // write
            # shape: with a context as long as the block or longer, the first
            # block is not in cell 0
            first = write.offset[a] // write.shape[a]
            start = total.begin[a] + (np.arange(n, dtype=np.int64) - first) * write.shape[a]
            wb.append(np.clip(start + write.offset[a], lo[a], hi[a]))
            we.append(np.clip(start + write.offset[a] + write.shape[a], lo[a], hi[a]))
            rb.append(np.clip(start + read.offset[a], lo[a], hi[a]))
            re.append(np.clip(start + read.offset[a] + read.shape[a], lo[a], hi[a]))
        return cls(wb, we, rb, re)

    @property
    def real(self) -> np.ndarray:
        """Cells that are blocks: daisy's grid has cells beyond the volume."""
        axes = [b < e for b, e in zip(self.write_begin, self.write_end)]
        return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


def _box_sums(counts: np.ndarray, lo: list[np.ndarray], hi: list[np.ndarray]) -> np.ndarray:
    """For every cell of a grid given by per-axis index ranges [lo, hi) into
    `counts`, the sum of `counts` over that box (0 for an empty box)."""
    table = np.pad(counts.astype(np.int64), [(1, 0)] * 3).cumsum(0).cumsum(1).cumsum(2)
    lo = [np.clip(x, 0, n) for x, n in zip(lo, counts.shape)]
    hi = [np.maximum(np.clip(x, 0, n), low) for x, n, low in zip(hi, counts.shape, lo)]
    total = np.zeros(tuple(len(x) for x in lo), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=3):
        sign = -1 if (3 - sum(corner)) % 2 else 1
        total += sign * table[np.ix_(*[(hi if c else lo)[a] for a, c in enumerate(corner)])]
    return total


def _index_ranges(begin: list[np.ndarray], end: list[np.ndarray], origin, step) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per axis, the indices [lo, hi) of a grid (cells of `step` from
    `origin`, world units) that the boxes [begin, end) meet."""
    lo = [(b - o) // s for b, o, s in zip(begin, origin, step)]
    hi = [np.where(e > b, -(-(e - o) // s), (b - o) // s) for b, e, o, s in zip(begin, end, origin, step)]
    return lo, hi


def keep_done_blocks(layout: RunLayout, run_dir: RunDir, steps: tuple[str, ...], graph_lost: bool) -> dict[str, int]:
    """Clear the done markers of blocks whose output is gone or that were
    built on a block that is redone (module note). Returns the blocks
    redone per step, for steps with any."""
    redone: dict[str, int] = {}
    pending: dict[str, tuple[np.ndarray, Cells]] = {}  # step -> (real blocks that will run, cells)
    for step in steps:
        markers = DoneMarkers(run_dir.tracking(step))
        if markers.shape is None:
            shape = tuple(int(x) for x in -(-np.array(layout.roi.shape) // np.array(step_geometry(layout, step)[2].shape)))
            cells = Cells.of(layout, step, shape)
            pending[step] = (cells.real, cells)
            continue
        cells = Cells.of(layout, step, markers.shape)
        done = markers.read()
        kept = done & cells.real
        if graph_lost and step in GRAPH_STEPS:
            kept[:] = False
        for name in outputs(layout, step):
            path = run_dir.volumes / name
            if not (path / ".zarray").exists():
                kept[:] = False
                continue
            files = ChunkFiles.of(open_ds(path))
            lo, hi = _index_ranges(cells.write_begin, cells.write_end, files.begin, files.spatial_chunk)
            kept &= _box_sums(~files.stored(), lo, hi) == 0
        for earlier, how in READS[step].items():
            if earlier not in pending:
                continue  # given affinities: no predict step
            will_run, earlier_cells = pending[earlier]
            if how == "all":
                if will_run.any():
                    kept[:] = False
                continue
            _, _, write = step_geometry(layout, earlier)[:3]
            origin = [b[0] for b in earlier_cells.write_begin]
            lo, hi = _index_ranges(cells.read_begin, cells.read_end, origin, write.shape)
            kept &= _box_sums(will_run, lo, hi) == 0
        cleared = done & ~kept
        if cleared.any():
            markers.clear(cleared)
            redone[step] = int(np.count_nonzero(cleared & cells.real))
        pending[step] = (cells.real & ~kept, cells)
    return redone


def finished_blocks(layout: RunLayout, run_dir: RunDir, step: str) -> int | None:
    """The number of blocks of `step` when every one is marked done (after
    `keep_done_blocks`), else None."""
    markers = DoneMarkers(run_dir.tracking(step))
    if markers.shape is None:
        return None
    real = Cells.of(layout, step, markers.shape).real
    return int(np.count_nonzero(real)) if (markers.read() | ~real).all() else None


def describe(redone: dict[str, int]) -> str:
    return ", ".join(f"{step} {n}" for step, n in redone.items())
