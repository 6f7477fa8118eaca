"""Typed configs of the block-wise job (`predict.py`: RunConfig) and the
checks they share with training; the training config is in
pipeline/training/config.py.

Every model forbids unknown keys, so a typo is an error, not a silently
ignored setting. Checks that need the data (voxel size, dtypes, ROI sizes)
live in `pipeline.orchestration.run_layout`, which reads the volumes once.

Paths are resolved against the working directory when the config is loaded,
and the run directory keeps an absolute copy (`config.json`) that every
worker reads, so workers never depend on where they were started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from pipeline.errors import UserError
from pipeline.schema import PositiveTriple, Strict, Triple
from pipeline.storage.credentials import masked


def in_plane(offsets) -> bool:
    """Offsets without a z component: a 2D model."""
    return all(o[0] == 0 for o in offsets)


# how a run partitions the volume after predict (RunConfig.partition; each
# is a class in pipeline/orchestration/partitioners.py)
PartitionName = Literal["waterz", "mutex_2d", "mutex_3d"]
# a model's outputs besides the affinities that the steps read (AffinitiesConfig.outputs)
GivenOutput = Literal["foreground", "uncertainty"]


def default_partition(offsets) -> PartitionName:
    """The partitioner of a config that names none (and of run directories
    from before the choice): what the offsets call for."""
    return "mutex_2d" if in_plane(offsets) else "waterz"


def offsets_error(offsets) -> str | None:
    """What is wrong with a model's offsets for its post-processing, or
    None: the waterz steps read the first three channels as the z, y, x nearest
    neighbours; mutex watershed (2D) reads the y, x ones first."""
    offsets = [tuple(int(x) for x in o) for o in offsets]
    if in_plane(offsets):
        if offsets[:2] != [(0, -1, 0), (0, 0, -1)]:
            return f"2D offsets must start with [0,-1,0], [0,0,-1], got {[list(o) for o in offsets[:2]]}"
    elif offsets[:3] != [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]:
        return f"the first three offsets must be [-1,0,0], [0,-1,0], [0,0,-1], got {[list(o) for o in offsets[:3]]}"
    return None


def _zarr_path(value: str) -> str:
    if ".zarr/" not in value:
        raise ValueError(f"{value!r} must name a dataset as CONTAINER.zarr/DATASET")
    return str(Path(value).absolute())


AbsPath = Annotated[str, AfterValidator(lambda v: str(Path(v).absolute()))]
ZarrPath = Annotated[str, AfterValidator(_zarr_path)]


class RoiConfig(Strict):
    """World units (nm), z y x."""

    offset: Triple
    shape: PositiveTriple


class ModelConfig(Strict):
    """A checkpoint written by `pipeline/train.py`, or the parameter-free
    intensity baseline (affinities from raw intensity, no network)."""

    checkpoint: AbsPath | None = None
    baseline: Literal["intensity"] | None = None
    # the affinities to predict (z, y, x voxels); default: the training
    # offsets. An embedding model gives any offset ("adaptive affinity"), an
    # affinity model a subset of its training offsets.
    offsets: list[Triple] | None = Field(default=None, min_length=2)
    # for a model with several representations (CRAC: "embedding", the
    # default, cosines of E's embedding at any offset; "explicit", F's
    # affinities at its training offsets): which gives the affinities
    representation: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelConfig:
        if (self.checkpoint is None) == (self.baseline is None):
            raise ValueError("give exactly one of checkpoint or baseline")
        return self


class AffinitiesConfig(Strict):
    """Affinities made elsewhere (another tool, or the `affs` of an earlier
    run) in place of a model: the job starts at fragments. A 4D zarr dataset
    (offset, z, y, x) on raw's voxel grid covering the run's ROI: uint8
    (0..255 for [0, 1]) or float in [0, 1], which is rounded to uint8 as the
    predict step rounds its own."""

    dataset: ZarrPath
    # one per channel, in channel order (z, y, x voxels)
    offsets: list[Triple] = Field(min_length=2)
    # the other outputs of the model that made them, where the steps read
    # them: "foreground" (uint8, one channel; mutex_2d segments inside it)
    # and "uncertainty" (float16, one channel per offset; the proofreading
    # list and the graph's edge attribute). With an earlier run's
    # volumes.zarr datasets, a run partitions its predictions again with
    # other settings (a mutex bias) without predicting them again
    outputs: dict[GivenOutput, ZarrPath] = {}


class PredictConfig(Strict):
    # "auto" picks cuda:{worker_id % n_gpus} when CUDA is available, else CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # voxels; rounded up to the nearest shape the network accepts
    output_shape: PositiveTriple = (64, 64, 64)
    workers: Annotated[int, Field(gt=0)] = 1
    # optional datasets of the method's model to write beside the
    # affinities, e.g. "embedding" (float16) for an embedding model
    extra_outputs: list[str] = []
    # what the network sees beyond the raw volume: "zero", as gunpowder's
    # Pad gives in training, or "mirror", the volume reflected at its border.
    # For independent 2D images, whose borders are the images' own, mirror
    # keeps a zero band from looking like an object at the border
    outside: Literal["zero", "mirror"] = "zero"


class FragmentsConfig(Strict):
    # "waterz": waterz's watershed on the nearest-neighbour affinities (our
    # compiled port, pipeline/kernels/compiled/waterz.py);
    # "distance": seeded watershed on the distance transform of the boundaries
    method: Literal["waterz", "distance"] = "waterz"
    # for "distance": run slice by slice (anisotropic data)
    per_section: bool = False
    # merge fragments whose score is below this first, in block + context
    # (see pipeline/kernels/watershed.py); 0 keeps the plain watershed. Every
    # agglomerate threshold must be at least this.
    epsilon_agglomerate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


def threshold_key(threshold: float) -> str:
    """The name of a threshold in file names, done markers and tables: the
    shortest text that reads back as exactly this float, so 0.121 and 0.124
    never share a look-up table."""
    return repr(float(threshold))


class AgglomerateConfig(Strict):
    # waterz's scoring functions (OneMinus of the median, the 75th
    # percentile or the mean affinity), as our compiled port has them
    scoring: Literal["hist_quant_50", "hist_quant_75", "mean"] = "hist_quant_50"
    thresholds: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1
    )
    # the threshold whose segmentation `relabel` writes
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5

    @model_validator(mode="after")
    def _threshold_listed(self) -> AgglomerateConfig:
        if self.threshold not in self.thresholds:
            raise ValueError(f"threshold {self.threshold} must be one of thresholds {self.thresholds}")
        if len(set(self.thresholds)) != len(self.thresholds):
            raise ValueError(f"thresholds {self.thresholds} lists a value twice")
        return self


class MutexConfig(Strict):
    """partition "mutex_2d" (2D models: each section is partitioned by
    mutex watershed) and "mutex_3d" (blocks, then the region graph)."""

    # affinities above it attract, below it repel (the score row is labelled
    # with it)
    bias: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    # one per offset, in offset order, in place of `bias`: e.g. the methods
    # notes' split, 0 for the nearest neighbours (they only attract) and 1
    # for the long-range offsets (they only repel)
    biases: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = None
    # keep only the long-range edges on this grid (z y x voxels; the notes:
    # 1 10 10): long-range edges mostly repel, and all of them over-split.
    # Nearest neighbours (one step along one axis) keep every edge
    long_range_stride: PositiveTriple | None = None
    # keep each long-range edge with probability 1 / prod(long_range_stride)
    # instead, drawn from `seed` and the section's index: the same run gives
    # the same segmentation
    randomized_strides: bool = False
    seed: Annotated[int, Field(ge=0)] = 0
    # mutex_3d: segments smaller than this (voxels) are removed and the
    # others grown back over them by a seeded watershed (the methods
    # notes' 200); 0 keeps every segment
    min_size: Annotated[int, Field(ge=0)] = 200
    # (size, window) in pixels, in turn: segments smaller than `size` join
    # the most frequent label in a window x window neighbourhood (the
    # methods notes' cascade for EM and leaves)
    merge_small: list[tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]] = [
        (5, 5), (20, 11), (50, 11), (300, 21)
    ]
    # models with a foreground output (data with background, e.g. nuclei):
    # pixels below this foreground probability are background (label 0),
    # and foreground specks smaller than `foreground_min_size` pixels too;
    # the mutex watershed partitions the rest
    foreground_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    foreground_min_size: Annotated[int, Field(ge=0)] = 20

    @model_validator(mode="after")
    def _randomized_needs_a_stride(self) -> MutexConfig:
        if self.randomized_strides and self.long_range_stride is None:
            raise ValueError("randomized_strides needs long_range_stride (the kept fraction is 1 / its product)")
        return self

    def channel_biases(self, channels: int) -> list[float]:
        return list(self.biases) if self.biases is not None else [self.bias] * channels


class PostprocessConfig(Strict):
    """Block geometry for fragments, agglomerate and relabel, world units."""

    block_shape: PositiveTriple
    context: Triple
    workers: Annotated[int, Field(gt=0)] = 1


class Resources(Strict):
    gpus: Annotated[int, Field(ge=0)] = 0
    cpus: Annotated[int, Field(gt=0)] = 1
    memory_gb: Annotated[float, Field(gt=0)] = 4.0
    queue: str | None = None
    time_limit_min: Annotated[int, Field(gt=0)] = 240


class LauncherConfig(Strict):
    # "local": worker processes on this machine; "slurm", "lsf": cluster
    # jobs; "in_process": every block in the master process, one after
    # another (pipeline/orchestration/in_process.py: small volumes, pdb)
    kind: Literal["local", "slurm", "lsf", "in_process"] = "local"
    # per step resources; steps not named get the defaults
    resources: dict[Literal["predict", "fragments", "agglomerate", "relabel"], Resources] = Field(
        default_factory=dict
    )
    # SQLite's locks do not hold on most network file systems (NFS, Lustre,
    # GPFS), which cluster workers share: concurrent writers can corrupt the
    # graph. Cluster launchers therefore need a MongoDB store, unless this is
    # set because run_dir is on a file system whose locks do work.
    allow_sqlite: bool = False


class RunConfig(Strict):
    """`pipeline/predict.py CONFIG`: raw volume in, segmentation out."""

    run_dir: AbsPath
    raw: ZarrPath
    # what a chunk of raw without a file means: "error" (an incomplete copy;
    # the run is refused, naming the chunk) or "empty" (a sparse volume
    # whose missing chunks are black on purpose: read as 0)
    raw_missing_chunks: Literal["error", "empty"] = "error"
    ground_truth: ZarrPath | None = None
    roi: RoiConfig | None = None
    # exactly one of the two: a model that predicts the affinities, or
    # affinities that exist already
    model: ModelConfig | None = None
    affinities: AffinitiesConfig | None = None
    # "sqlite" (a file in run_dir), or a MongoDB URI such as
    # "mongodb://host:27017/affseg_run1" (the path names the database)
    store: str = "sqlite"
    # a file (mode 600) whose first line is the MongoDB password, for a URI
    # such as "mongodb://user@host/db"; or set AFFSEG_MONGODB_PASSWORD. See
    # pipeline/storage/credentials.py: a password is never written anywhere
    store_password_file: AbsPath | None = None
    # seconds a MongoDB server may stall (frozen, unreachable) before a
    # request fails; the worker's block is then retried, never stuck
    store_timeout_s: Annotated[float, Field(gt=0)] = 120
    predict: PredictConfig = PredictConfig()
    # how the volume is partitioned after predict: "waterz" (fragments, the
    # region graph, agglomeration with a table per threshold: the
    # `fragments` and `agglomerate` settings) or "mutex_2d" (a 2D model's
    # sections, each by mutex watershed: the `mutex` settings) or
    # "mutex_3d" (a 3D model's blocks by mutex watershed, then the graph
    # mutex watershed over the region graph: the `mutex` settings). Left out:
    # what the offsets call for (in-plane: mutex_2d, else waterz). Only the
    # chosen partitioner's settings are read and recorded
    partition: PartitionName | None = None
    fragments: FragmentsConfig = FragmentsConfig()
    agglomerate: AgglomerateConfig = AgglomerateConfig()
    mutex: MutexConfig = MutexConfig()
    postprocess: PostprocessConfig
    launcher: LauncherConfig = LauncherConfig()
    # seconds before a block is considered stuck and retried elsewhere
    block_timeout_s: Annotated[int, Field(gt=0)] = 1800

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value == "sqlite" or value.startswith(("mongodb://", "mongodb+srv://")):
            return value
        raise ValueError(f"{masked(value)!r} is neither 'sqlite' nor a mongodb:// URI")

    @model_validator(mode="after")
    def _model_or_affinities(self) -> RunConfig:
        if (self.model is None) == (self.affinities is None):
            raise ValueError("give exactly one of model (predict the affinities) or affinities (given ones)")
        return self

    @model_validator(mode="after")
    def _sqlite_stays_local(self) -> RunConfig:
        if self.store == "sqlite" and self.launcher.kind in ("slurm", "lsf") and not self.launcher.allow_sqlite:
            raise ValueError(
                f"store: SQLite with the {self.launcher.kind} launcher is refused: cluster workers share run_dir "
                f"over a network file system, where SQLite's locks are unsafe; use a mongodb:// store (or set "
                f"launcher.allow_sqlite: true if run_dir's file system supports POSIX locks)"
            )
        return self

    @model_validator(mode="after")
    def _in_process_is_one_worker(self) -> RunConfig:
        if self.launcher.kind == "in_process" and (self.predict.workers, self.postprocess.workers) != (1, 1):
            raise ValueError(
                f"launcher.kind in_process runs one block at a time in the master process: predict.workers "
                f"({self.predict.workers}) and postprocess.workers ({self.postprocess.workers}) must be 1"
            )
        return self

    @model_validator(mode="after")
    def _epsilon_below_thresholds(self) -> RunConfig:
        smallest = min(self.agglomerate.thresholds)
        if self.fragments.epsilon_agglomerate > smallest:
            raise ValueError(
                f"fragments.epsilon_agglomerate {self.fragments.epsilon_agglomerate} is above the smallest "
                f"agglomerate threshold {smallest}: that segmentation would not exist"
            )
        return self


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    return data
