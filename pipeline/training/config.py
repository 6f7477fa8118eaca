"""Typed config for `pipeline/train.py`: the training volumes, the backbone,
the method (pipeline/methods/), augmentations and the optimiser's schedule.

It lives apart from the run config (pipeline/config.py) because a method's
settings are defined beside its torch code: the block-wise job's workers
load run configs only and so never import torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config import AbsPath, RoiConfig, ZarrPath, in_plane, offsets_error
from pipeline.methods import MethodConfig, affinity
from pipeline.schema import PositiveTriple, Probability, Strict, Triple


class TrainVolume(Strict):
    raw: ZarrPath
    labels: ZarrPath
    roi: RoiConfig | None = None
    # sparse annotation: either a mask dataset (non-zero = annotated) or
    # `sparse: true`, the convention that label 0 means "unknown" (not
    # background). Pairs of two unannotated voxels leave the loss; a pair of
    # an annotated and an unannotated voxel stays, with target 0, because
    # annotated instances are whole.
    labels_mask: ZarrPath | None = None
    sparse: bool = False


class MalaUNetConfig(Strict):
    """Valid-convolution U-Net (networks/mala_unet.py)."""

    name: Literal["mala_unet"] = "mala_unet"
    # raw's channels: 1 for EM and single-stain images, 3 for RGB
    in_channels: Annotated[int, Field(gt=0)] = 1
    num_fmaps: Annotated[int, Field(gt=0)] = 12
    fmap_inc_factor: Annotated[int, Field(gt=0)] = 3
    downsample_factors: list[PositiveTriple] = [(2, 2, 2), (2, 2, 2)]


class ResidualUNetConfig(Strict):
    """Same-padding residual U-Net (networks/residual_unet.py): SuperHuman
    style in 3D; `dims: 2` runs section by section."""

    name: Literal["residual_unet"]
    # raw's channels: 1 for EM and single-stain images, 3 for RGB
    in_channels: Annotated[int, Field(gt=0)] = 1
    dims: Literal[2, 3] = 3
    widths: list[Annotated[int, Field(gt=0)]] = [28, 36, 48, 64, 80]
    # (1, 2, 2) for anisotropic serial sections, (2, 2, 2) for FIB-SEM
    downsample_factors: list[PositiveTriple] = [(1, 2, 2)] * 4
    # voxels cut off each side of the output (they saw zero padding);
    # default (2, 16, 16) in 3D, (0, 16, 16) in 2D
    crop: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]

    @model_validator(mode="before")
    @classmethod
    def _default_crop(cls, data):
        if isinstance(data, dict) and "crop" not in data:
            data = {**data, "crop": (0, 16, 16) if data.get("dims") == 2 else (2, 16, 16)}
        return data

    @model_validator(mode="after")
    def _buildable(self) -> ResidualUNetConfig:
        from networks.residual_unet import ResidualUNetSpec

        ResidualUNetSpec(
            dims=self.dims, widths=tuple(self.widths),
            downsample_factors=tuple(self.downsample_factors), crop=self.crop,
        )  # raises ValueError with the reason
        return self


NetworkConfig = Annotated[MalaUNetConfig | ResidualUNetConfig, Field(discriminator="name")]


class ElasticConfig(Strict):
    """gunpowder ElasticAugment; spacing and sigma in voxels, z y x."""

    control_point_spacing: PositiveTriple = (4, 40, 40)
    jitter_sigma: tuple[float, float, float] = (0.0, 2.0, 2.0)
    # random in-plane rotation by any angle
    rotate: bool = True
    # misalignment: one section slips, or it and all after it shift, by up
    # to `max_misalign` voxels in y and x
    prob_slip: Probability = 0.05
    prob_shift: Probability = 0.05
    max_misalign: Annotated[int, Field(ge=0)] = 8
    subsample: Annotated[int, Field(gt=0)] = 4


class IntensityConfig(Strict):
    scale: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-0.1, 0.1)


class ArtifactConfig(Strict):
    """Real imaging artifacts (dust, stains, cracks) blended into whole
    sections: `raw` holds the artifacts' intensities, `alpha` their opacity
    (255 = opaque), both uint8 `CONTAINER.zarr/DATASET` arrays with the
    training data's voxel size, at least one network input wide in y and x.
    Sections and positions are drawn at random."""

    raw: str
    alpha: str
    probability: Probability = 0.03


class DefectConfig(Strict):
    """gunpowder DefectAugment along z: blank and low-contrast sections, and
    optionally sections with artifacts from an artifact volume."""

    prob_missing: Probability = 0.03
    prob_low_contrast: Probability = 0.03
    contrast_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    artifacts: ArtifactConfig | None = None

    @model_validator(mode="after")
    def _one_defect_per_section(self) -> DefectConfig:
        # DefectAugment draws one kind of defect per section
        total = self.prob_missing + self.prob_low_contrast + (self.artifacts.probability if self.artifacts else 0.0)
        if total > 1.0:
            raise ValueError(f"the defect probabilities add up to {total:g}; at most 1")
        return self


class AugmentConfig(Strict):
    """Each augmentation can be switched off with null (false for mirror and
    transpose). Transposes are only between axes of equal voxel size, so
    anisotropic data keeps z where it is."""

    elastic: ElasticConfig | None = ElasticConfig()
    mirror: bool = True
    transpose: bool = True
    intensity: IntensityConfig | None = IntensityConfig()
    defects: DefectConfig | None = DefectConfig()
    # labels become background where an in-plane 3x3 neighbourhood holds
    # several labels (the methods notes' border widening)
    grow_boundary: Annotated[int, Field(ge=0)] = 1


class OptimizerConfig(Strict):
    """torch's Adam or AdamW. The PEA paper's: adam, learning_rate 1e-4,
    eps 0.01, weight_decay 1e-6, amsgrad true."""

    name: Literal["adam", "adamw"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    # Adam adds it to the gradient (L2), AdamW decays the weights directly
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    amsgrad: bool = False


class ScheduleConfig(Strict):
    """The learning rate as a function of the iteration alone (so a resumed
    run continues it exactly): a linear warm-up from 0 over `warmup`
    iterations, then `decay` from optimizer.learning_rate down to
    `final` x learning_rate at iteration `until`, constant after it.
    `until` is its own setting, not `iterations`: raising `iterations` to
    train on must not bend the schedule already followed."""

    warmup: Annotated[int, Field(ge=0)] = 0
    decay: Literal["constant", "linear", "cosine"] = "cosine"
    until: Annotated[int, Field(gt=0)] | None = None
    final: Annotated[float, Field(ge=0, le=1)] = 0.0

    @model_validator(mode="after")
    def _horizon(self) -> ScheduleConfig:
        if self.decay != "constant" and self.until is None:
            raise ValueError(f"a {self.decay} decay needs `until`, the iteration it ends at")
        if self.until is not None and self.until <= self.warmup:
            raise ValueError(f"until ({self.until}) must come after the warm-up ({self.warmup} iterations)")
        return self


class TrainConfig(Strict):
    """`pipeline/train.py CONFIG`."""

    experiment_dir: AbsPath
    volumes: list[TrainVolume] = Field(min_length=1)
    network: NetworkConfig = MalaUNetConfig()
    # the heads, targets and loss (pipeline/methods/): "affinity" predicts the
    # offsets' affinities, "embedding" (PEA) an embedding whose cosines they are
    method: MethodConfig = affinity.Settings()
    # the training offsets (z, y, x voxels)
    offsets: list[Triple] = Field(min_length=2)
    # voxels; rounded up to a shape the network accepts
    output_shape: PositiveTriple = (36, 36, 36)
    iterations: Annotated[int, Field(gt=0)]
    augment: AugmentConfig = AugmentConfig()
    # random locations whose output holds less than this fraction of voxels
    # of annotated instances are rejected (sparse labels only; known
    # background in a labels_mask does not count)
    min_annotated: Probability = 0.05
    # batches assembled in parallel processes ahead of training; 0 = inline
    precache_workers: Annotated[int, Field(ge=0)] = 4
    save_every: Annotated[int, Field(gt=0)] = 500
    # TensorBoard scalars (EXPERIMENT_DIR/tensorboard) every N iterations
    log_every: Annotated[int, Field(gt=0)] = 10
    # zarr snapshots (raw, labels, target, prediction) every N; 0 = never
    snapshot_every: Annotated[int, Field(ge=0)] = 1000
    # samples per batch (gunpowder Stack); the loss is their mean, and
    # batch statistics (CRAC's entropy percentile) span the whole batch
    batch_size: Annotated[int, Field(gt=0)] = 1
    optimizer: OptimizerConfig = OptimizerConfig()
    # null: optimizer.learning_rate throughout
    lr_schedule: ScheduleConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bfloat16 autocast on CUDA (ignored on CPU)
    mixed_precision: bool = True
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "learning_rate" in data:
            raise ValueError(f"learning_rate is now optimizer.learning_rate: write \"optimizer\": "
                             f"{{\"learning_rate\": {data['learning_rate']}}}")
        return data

    @model_validator(mode="after")
    def _offsets_fit_network(self) -> TrainConfig:
        planar = getattr(self.network, "dims", 3) == 2
        if in_plane(self.offsets) != planar:
            raise ValueError("offsets of a 2D network have no z component; a 3D network's do" if planar else
                             "the first three offsets must be [-1,0,0], [0,-1,0], [0,0,-1]")
        error = offsets_error(self.offsets)
        if error:
            raise ValueError(error)
        return self
