"""Typed configs for `train.py` and `predict.py`.

Every model forbids unknown keys, so a typo is an error, not a silently
ignored setting. Checks that need the data (voxel size, dtypes, ROI sizes)
live in `pipeline.run_layout`, which reads the volumes once.

Paths are resolved against the working directory when the config is loaded,
and the run directory keeps an absolute copy (`config.json`) that every
worker reads, so workers never depend on where they were started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import UserError

Triple = tuple[int, int, int]
PositiveTriple = tuple[
    Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    @model_validator(mode="after")
    def _one_of(self) -> ModelConfig:
        if (self.checkpoint is None) == (self.baseline is None):
            raise ValueError("give exactly one of checkpoint or baseline")
        return self


class PredictConfig(Strict):
    # "auto" picks cuda:{worker_id % n_gpus} when CUDA is available, else CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # voxels; rounded up to the nearest shape the network accepts
    output_shape: PositiveTriple = (64, 64, 64)
    workers: Annotated[int, Field(gt=0)] = 1


class FragmentsConfig(Strict):
    # "waterz": waterz's own watershed on the nearest-neighbour affinities;
    # "distance": seeded watershed on the distance transform of the boundaries
    method: Literal["waterz", "distance"] = "waterz"
    # for "distance": run slice by slice (anisotropic data)
    per_section: bool = False
    # merge fragments whose score is below this first, in block + context
    # (see pipeline/watershed.py); 0 keeps the plain watershed. Every
    # agglomerate threshold must be at least this.
    epsilon_agglomerate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


class AgglomerateConfig(Strict):
    # prebuilt waterz scoring functions only: no compiler needed
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
        return self


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
    kind: Literal["local", "slurm", "lsf"] = "local"
    # per step resources; steps not named get the defaults
    resources: dict[Literal["predict", "fragments", "agglomerate", "relabel"], Resources] = Field(
        default_factory=dict
    )


class RunConfig(Strict):
    """`pipeline/predict.py CONFIG`: raw volume in, segmentation out."""

    run_dir: AbsPath
    raw: ZarrPath
    ground_truth: ZarrPath | None = None
    roi: RoiConfig | None = None
    model: ModelConfig
    # "sqlite" (a file in run_dir), or a MongoDB URI such as
    # "mongodb://host:27017/affseg_run1" (the path names the database)
    store: str = "sqlite"
    predict: PredictConfig = PredictConfig()
    fragments: FragmentsConfig = FragmentsConfig()
    agglomerate: AgglomerateConfig = AgglomerateConfig()
    postprocess: PostprocessConfig
    launcher: LauncherConfig = LauncherConfig()
    # seconds before a block is considered stuck and retried elsewhere
    block_timeout_s: Annotated[int, Field(gt=0)] = 1800

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value == "sqlite" or value.startswith(("mongodb://", "mongodb+srv://")):
            return value
        raise ValueError(f"{value!r} is neither 'sqlite' nor a mongodb:// URI")

    @model_validator(mode="after")
    def _epsilon_below_thresholds(self) -> RunConfig:
        smallest = min(self.agglomerate.thresholds)
        if self.fragments.epsilon_agglomerate > smallest:
            raise ValueError(
                f"fragments.epsilon_agglomerate {self.fragments.epsilon_agglomerate} is above the smallest "
                f"agglomerate threshold {smallest}: that segmentation would not exist"
            )
        return self


class TrainVolume(Strict):
    raw: ZarrPath
    labels: ZarrPath
    roi: RoiConfig | None = None


class NetworkConfig(Strict):
    name: Literal["mala_unet"] = "mala_unet"
    num_fmaps: Annotated[int, Field(gt=0)] = 12
    fmap_inc_factor: Annotated[int, Field(gt=0)] = 3
    downsample_factors: list[PositiveTriple] = [(2, 2, 2), (2, 2, 2)]


class TrainConfig(Strict):
    """`pipeline/train.py CONFIG`."""

    experiment_dir: AbsPath
    volumes: list[TrainVolume] = Field(min_length=1)
    network: NetworkConfig = NetworkConfig()
    offsets: list[Triple] = Field(min_length=3)
    # voxels; rounded up to a shape the network accepts
    output_shape: PositiveTriple = (36, 36, 36)
    iterations: Annotated[int, Field(gt=0)]
    save_every: Annotated[int, Field(gt=0)] = 500
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @field_validator("offsets")
    @classmethod
    def _nearest_first(cls, offsets: list[Triple]) -> list[Triple]:
        # waterz reads the first three channels as the z, y, x nearest neighbours
        if [tuple(o) for o in offsets[:3]] != [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]:
            raise ValueError("the first three offsets must be [-1,0,0], [0,-1,0], [0,0,-1]")
        return offsets


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
