"""How a run partitions the volume after predict: one object per
partitioner, the one home of what it means for the rest of the job.

The choice is `RunConfig.partition` (or, when the config leaves it out,
what the model's offsets call for), resolved once into `RunLayout.partition`
and recorded in the run directory. The master, evaluation, status and the
workers ask the run's partitioner for its steps, the volumes it writes, its
daisy tasks, its master step, its look-up tables and the settings its
finished blocks depend on, instead of testing the offsets themselves.

- `waterz`: waterz fragments per block, the region graph, one look-up table
  per agglomeration threshold (the `segments` master step), relabel.
- `mutex_2d`: a 2D model's sections, each partitioned whole by mutex
  watershed straight into the segmentation (no tables).
- `mutex_3d`: mutex watershed fragments per block, the region graph of
  every pair of fragments an offset links, one table by the graph mutex
  watershed on the master, relabel.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import ClassVar, NamedTuple

import daisy
from funlib.geometry import Coordinate, Roi

from pipeline.config import PartitionName, RunConfig, in_plane, threshold_key
from pipeline.errors import UserError
from pipeline.orchestration.daisy_run import master_step, run_daisy
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.run_layout import RunDir, RunLayout, run_store
from pipeline.orchestration.segments import write_luts, write_mutex_lut
from pipeline.orchestration.tasks import chain, step_task
from pipeline.storage.files import write_atomically


class Row(NamedTuple):
    """One row of a run's scores: its label (the `threshold` column) and
    the look-up table that maps `Partitioner.labels` to the segmentation
    scored (None: the labels are the segmentation)."""

    threshold: float
    table: str | None


class Partitioner(ABC):
    name: ClassVar[PartitionName]
    # the steps after predict, in order, master steps among them
    steps: ClassVar[tuple[str, ...]]
    # the first of them, block steps that daisy chains after predict block
    # by block; `finish` runs the rest
    pipelined: ClassVar[tuple[str, ...]]
    # steps the master runs itself (no blocks, no done markers)
    master_steps: ClassVar[tuple[str, ...]] = ()
    # the uint64 run volumes it writes, on the post-processing blocks
    volumes: ClassVar[tuple[str, ...]]
    # the volume evaluation reads (through each row's table, if any)
    labels: ClassVar[str]
    # each section is an image of its own: evaluation adds the 2D instance
    # scores (AJI, PQ, ...) averaged over sections
    sections_are_images: ClassVar[bool] = False

    @abstractmethod
    def unfit(self, config: RunConfig, offsets) -> str | None:
        """Why these affinities cannot be partitioned this way with the
        config's settings, or None."""

    @abstractmethod
    def check_geometry(self, config: RunConfig, offsets, roi: Roi, block_shape: Coordinate, voxel_size: Coordinate) -> None:
        """Refuse post-processing blocks this partitioner cannot use (UserError)."""

    @abstractmethod
    def record(self, config: RunConfig) -> dict:
        """The settings its finished blocks depend on (in the run record:
        a change is refused). Only this partitioner's settings."""

    @abstractmethod
    def rows(self, config: RunConfig) -> list[Row]:
        """The rows of the run's scores, in order."""

    @abstractmethod
    def chosen(self, config: RunConfig) -> str:
        """What the segmentation volume holds, in words."""

    def check_tables(self, config: RunConfig, run_dir: RunDir) -> None:
        """Refuse an evaluation whose tables the run has not built."""

    def before_resume(self, config: RunConfig, run_dir: RunDir) -> None:
        """Clear done markers that belong to another choice than `config`'s,
        before any are read."""

    def pipeline(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, done: Collection[str]) -> daisy.Pipeline | None:
        """predict (if the run predicts) and the block steps before the
        master's, pipelined block by block, less the steps in `done`."""
        return chain(config, layout, run_dir, done, *self.pipelined)

    def finish(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, progress: ProgressLog, report: dict,
               done: Collection[str]) -> None:
        """The master step and the block steps after it (none by default)."""


class GraphPartitioner(Partitioner):
    """Fragments per block, a region graph in the store, look-up tables
    built by the master (`segments`) and relabel through the chosen one."""

    master_steps = ("segments",)
    volumes = ("fragments", "segmentation")
    labels = "fragments"
    # the block step after `segments` that writes `segmentation`
    relabel_step: ClassVar[str]

    def check_geometry(self, config: RunConfig, offsets, roi: Roi, block_shape: Coordinate, voxel_size: Coordinate) -> None:
        # fragments cut at a block's border need a neighbour's voxels to be
        # joined again
        context = config.postprocess.context
        if any(c < s for c, s in zip(context, voxel_size)):
            raise UserError(f"postprocess.context: {list(context)} must be at least one voxel ({list(voxel_size)}) per axis")

    @abstractmethod
    def relabel_target(self, config: RunConfig) -> dict:
        """What relabel writes to `segmentation` (its table's key under
        "table"): its done markers are valid for this target only."""

    @abstractmethod
    def build_tables(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, store) -> dict[str, int]:
        """The `segments` step: every table of `rows`; the graph's counts."""

    def before_resume(self, config: RunConfig, run_dir: RunDir) -> None:
        # relabel's done markers belong to the table the segmentation holds:
        # when the chosen one differs (0.5, then 0.3, then 0.5 again) they
        # are cleared before the target is recorded, so every block is
        # redone and a crash between the two still leaves no marker of the
        # old table
        target = self.relabel_target(config)
        recorded = json.loads(run_dir.relabel_target.read_text()) if run_dir.relabel_target.exists() else None
        if recorded != target:
            shutil.rmtree(run_dir.tracking(self.relabel_step), ignore_errors=True)
            write_atomically(run_dir.relabel_target, json.dumps(target))

    def finish(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, progress: ProgressLog, report: dict,
               done: Collection[str]) -> None:
        def segments() -> dict[str, int]:
            with run_store(config, run_dir) as store:
                store.check_holds_run(run_dir.run_id())
                return self.build_tables(config, layout, run_dir, store)

        report["graph"] = master_step("segments", progress, report, segments)
        if self.relabel_step not in done:
            run_daisy(step_task(self.relabel_step, config, layout, run_dir), progress, report, run_dir.logs)


class Waterz(GraphPartitioner):
    name = "waterz"
    steps = ("fragments", "agglomerate", "segments", "relabel")
    pipelined = ("fragments", "agglomerate")
    relabel_step = "relabel"

    def unfit(self, config: RunConfig, offsets) -> str | None:
        if in_plane(offsets):
            return "waterz agglomerates 3D affinities; these offsets are all in-plane (a 2D model): use mutex_2d"
        return None

    def record(self, config: RunConfig) -> dict:
        # thresholds are not in it: tables and relabelling are redone per threshold
        return {"fragments": config.fragments.model_dump(), "scoring": config.agglomerate.scoring}

    @staticmethod
    def table(scoring: str, threshold: float) -> str:
        """The key of a threshold's look-up table (RunDir.lut)."""
        return f"{scoring}/{threshold_key(threshold)}"

    def rows(self, config: RunConfig) -> list[Row]:
        return [Row(t, self.table(config.agglomerate.scoring, t)) for t in sorted(config.agglomerate.thresholds)]

    def chosen(self, config: RunConfig) -> str:
        return f"threshold {config.agglomerate.threshold}"

    def relabel_target(self, config: RunConfig) -> dict:
        return {"table": self.table(config.agglomerate.scoring, config.agglomerate.threshold)}

    def check_tables(self, config: RunConfig, run_dir: RunDir) -> None:
        for row in self.rows(config):
            if not run_dir.lut(row.table).exists():
                raise UserError(
                    f"agglomerate.thresholds: the run has no look-up table for threshold {threshold_key(row.threshold)} "
                    f"({config.agglomerate.scoring}); run pipeline/predict.py with this config first, it builds the tables"
                )

    def build_tables(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, store) -> dict[str, int]:
        tables = {t: self.table(config.agglomerate.scoring, t) for t in config.agglomerate.thresholds}
        return write_luts(layout, run_dir, store, tables)


class Mutex3D(GraphPartitioner):
    """Mutex watershed fragments per block (all channels, with context),
    a region graph of every pair of fragments an offset links, the graph
    mutex watershed on the master into one table (no threshold), and
    relabel with the small segments grown over (workers/mutex_relabel.py)."""

    name = "mutex_3d"
    steps = ("mutex_fragments", "mutex_graph", "segments", "mutex_relabel")
    pipelined = ("mutex_fragments", "mutex_graph")
    relabel_step = "mutex_relabel"
    # evaluation scores the segmentation itself: growing is not a table
    labels = "segmentation"
    TABLE = "mutex"

    def unfit(self, config: RunConfig, offsets) -> str | None:
        if in_plane(offsets):
            return "mutex_3d partitions 3D affinities; these offsets are all in-plane (a 2D model): use mutex_2d"
        return _biases_unfit(config, offsets)


    def record(self, config: RunConfig) -> dict:
        # the 2D cascade and foreground settings play no part in 3D
        return {"mutex": config.mutex.model_dump(mode="json", include=MUTEX_3D_SETTINGS)}

    def rows(self, config: RunConfig) -> list[Row]:
        # one segmentation, reported in the row of its bias
        return [Row(config.mutex.bias, None)]

    def chosen(self, config: RunConfig) -> str:
        return "mutex watershed"

    def relabel_target(self, config: RunConfig) -> dict:
        return {"table": self.TABLE, "min_size": config.mutex.min_size}

    def build_tables(self, config: RunConfig, layout: RunLayout, run_dir: RunDir, store) -> dict[str, int]:
        return write_mutex_lut(layout, run_dir, store, self.TABLE, config.mutex.channel_biases(len(layout.offsets)),
                               config.mutex.min_size)


# the settings of MutexConfig that a mutex_3d run reads
MUTEX_3D_SETTINGS = {"bias", "biases", "long_range_stride", "randomized_strides", "seed"}


def _biases_unfit(config: RunConfig, offsets) -> str | None:
    biases = config.mutex.biases
    if biases is not None and len(biases) != len(offsets):
        return f"mutex.biases has {len(biases)} values and the run {len(offsets)} offsets: give one per offset"
    return None


class Mutex2D(Partitioner):
    name = "mutex_2d"
    steps = ("mutex",)
    pipelined = ("mutex",)
    volumes = ("segmentation",)
    labels = "segmentation"
    sections_are_images = True

    def unfit(self, config: RunConfig, offsets) -> str | None:
        if not in_plane(offsets):
            return "mutex_2d partitions each section alone and needs in-plane offsets (a 2D model); these have z components"
        return _biases_unfit(config, offsets)

    def check_geometry(self, config: RunConfig, offsets, roi: Roi, block_shape: Coordinate, voxel_size: Coordinate) -> None:
        # sections are segmented whole, one block holding several of them;
        # they need no context
        if any(b < r for b, r in zip(block_shape[1:], roi.shape[1:])):
            raise UserError(
                f"postprocess.block_shape: a 2D model's sections are segmented whole; make the block cover "
                f"the ROI in y and x ({list(roi.shape[1:])})"
            )

    def record(self, config: RunConfig) -> dict:
        return {"mutex": config.mutex.model_dump(mode="json")}

    def rows(self, config: RunConfig) -> list[Row]:
        # one segmentation, reported in the row of its bias
        return [Row(config.mutex.bias, None)]

    def chosen(self, config: RunConfig) -> str:
        return "mutex watershed"


PARTITIONERS: dict[str, Partitioner] = {p.name: p for p in (Waterz(), Mutex2D(), Mutex3D())}
