"""What every method provides, and the affinity arithmetic they share.

A method is one module in this package. It owns:

- `Settings`: its pydantic settings, with `name: Literal["<method>"]`, the
  `method` section of a training config (a discriminated union, see
  `pipeline.methods.MethodConfig`);
- `Model(MethodModel)`: the heads it puts on a method-free backbone, the
  outputs they give at predict time and how those become affinities for any
  list of offsets the run asks for;
- `TrainingStep(MethodStep)`: a torch module that takes a `TrainingBatch`
  (raw, labels, annotation mask, affinity targets and their mask) and the
  `Progress` of training, and returns named loss terms and the predictions
  to show in snapshots (`StepOutput`). It computes whatever other targets
  the method needs from the labels, and may keep state of its own (an EMA
  teacher): its `state_dict` is what a checkpoint holds.

Nothing outside this package branches on the method: the training loop
(`pipeline/training/loop.py`) runs the step and optimises its trainable
parameters, the predict worker asks the model for affinities and extra
outputs, and checkpoints record the method with its settings.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.kernels.rag import offset_pairs
from pipeline.schema import Strict

Offset = tuple[int, int, int]


class ForegroundSettings(Strict):
    """Data with background (nuclei, cells): a 2-class foreground head
    beside the method's own, trained with cross-entropy on the annotated
    voxels; the 2D segmentation then runs inside the predicted foreground."""

    # (background, foreground) class weights; the published PEA nuclei
    # config weighs foreground 10:1
    class_weights: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1.0, 10.0)
    weight: Annotated[float, Field(gt=0)] = 1.0


class MethodModel(nn.Module, ABC):
    """A backbone with a method's heads, and the optional foreground head
    every method offers. `offsets` are the training offsets; `geometry` is
    the backbone's.

    A model with several representations that give affinities (CRAC's
    embedding and explicit affinities) names them in `representations`,
    the default first; the run config's `model.representation` sets
    `representation` after loading, and forward, affinities, reach and the
    outputs follow it. Most models have one and name none."""

    representations: tuple[str, ...] = ()
    representation: str | None = None

    def __init__(self, backbone: nn.Module, offsets, foreground: ForegroundSettings | None = None):
        super().__init__()
        self.backbone = backbone
        self.offsets: tuple[Offset, ...] = tuple(tuple(int(x) for x in o) for o in offsets)
        self.geometry = backbone.geometry
        self.foreground = nn.Conv3d(backbone.out_channels, 2, 1) if foreground is not None else None
        self.foreground_settings = foreground

    @property
    def in_channels(self) -> int:
        """Raw channels the backbone reads (the no-network baseline: one)."""
        return getattr(getattr(self.backbone, "spec", None), "in_channels", 1)

    def foreground_outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"foreground": probability (B, 1, ...)} for a model with the head.

        Class weights (w_bg, w_fg) in the cross-entropy shift the logit that
        minimises it by log(w_fg / w_bg); taking that shift off again gives
        a calibrated probability, so 0.5 means "as likely as not"."""
        if self.foreground is None:
            return {}
        return {"foreground": self.foreground_probability(self.foreground(features))}

    def foreground_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) calibrated probability from the head's (B, 2, ...) logits."""
        background, foreground = self.foreground_settings.class_weights
        shift = math.log(foreground / background)
        return torch.sigmoid(logits[:, 1:] - logits[:, :1] - shift)

    @abstractmethod
    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named predict-time outputs (B, C, z, y, x) over the network's output region."""

    @abstractmethod
    def affinities(self, outputs: dict[str, torch.Tensor], offsets) -> torch.Tensor:
        """Affinities in [0, 1] for `offsets` (B, len(offsets), z, y, x); a
        pair whose partner lies outside the outputs gets 0."""

    def predict(self, outputs: dict[str, torch.Tensor], offsets) -> dict[str, torch.Tensor]:
        """What the predict step stores for the run's `offsets`: "affs"
        (`affinities`) and the outputs derived from the network's with
        them (the latent-mask model's uncertainty); the network's own
        outputs are `forward`'s."""
        return {"affs": self.affinities(outputs, offsets)}

    def reach(self, offsets) -> tuple[int, int, int]:
        """Voxels of outputs needed beyond a block on each side to give
        every affinity of `offsets` inside it."""
        return (0, 0, 0)

    def offsets_error(self, offsets) -> str | None:
        """Why this model cannot give affinities for `offsets`, or None."""
        return None

    def outputs(self, offsets) -> dict[str, tuple[int, str]]:
        """Datasets the predict step can write besides the affinities of the
        run's `offsets` (`forward`'s and `predict`'s): name -> (channels,
        dtype: uint8 for values in [0, 1], or float16)."""
        return {"foreground": (1, "uint8")} if self.foreground is not None else {}

    def needed_outputs(self) -> tuple[str, ...]:
        """Outputs the segmentation reads, always written (the foreground)."""
        return ("foreground",) if self.foreground is not None else ()


@dataclass(frozen=True)
class Progress:
    """Where training is: `iteration` updates are done before this step
    (0 for the first), `total` is the config's planned `iterations`."""

    iteration: int
    total: int


@dataclass(frozen=True)
class TrainingBatch:
    """One batch as the step sees it, on the training device: raw (B, C, z,
    y, x) in [0, 1]; labels (B, z, y, x) int64, 0 = background, or unknown
    where `labels_mask` is 0; the affinity targets of the training offsets
    (B, offsets, z, y, x) and their mask (the pairs with an annotated voxel)."""

    raw: torch.Tensor
    labels: torch.Tensor
    labels_mask: torch.Tensor
    affs: torch.Tensor
    affs_mask: torch.Tensor


@dataclass(frozen=True)
class StepOutput:
    """`losses`: named scalar terms, each with its weight applied; the loss
    optimised is their sum, and each is logged. `snapshot`: named (B, C, z,
    y, x) predictions written into the zarr snapshots. `metrics`: numbers
    to log beside the losses (a schedule's value, a fraction of pairs)."""

    losses: dict[str, torch.Tensor]
    snapshot: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


class MethodStep(nn.Module, ABC):
    """The training step of a method. The loop optimises the parameters
    that require gradients (a teacher copy holds its weights in parameters
    that do not, so they are checkpointed but not optimised)."""

    def __init__(self, model: MethodModel):
        super().__init__()
        self.model = model

    @abstractmethod
    def forward(self, batch: TrainingBatch, progress: Progress) -> StepOutput:
        """The loss terms and snapshot predictions of one batch."""

    def after_update(self, progress: Progress) -> None:
        """Called after each optimiser step (an EMA teacher follows here)."""

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def foreground_loss(logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor,
                    settings: ForegroundSettings) -> torch.Tensor:
    """Class-weighted cross-entropy of (B, 2, ...) logits against labels > 0,
    averaged over the annotated voxels, times the settings' weight."""
    weights = torch.tensor(settings.class_weights, device=logits.device, dtype=logits.dtype)
    per_voxel = F.cross_entropy(logits, (labels > 0).long(), weight=weights, reduction="none")
    annotated = annotated.to(per_voxel.dtype)
    return settings.weight * (per_voxel * annotated).sum() / annotated.sum().clamp(min=1)


def pair_values(values: torch.Tensor, offsets, combine) -> tuple[torch.Tensor, torch.Tensor]:
    """For each offset o, `combine(values[..., i], values[..., i + o])` over
    the spatial axes of (B, C, z, y, x) `values`, and a bool mask of the
    pairs whose partner lies inside: (B, len(offsets), z, y, x) each.
    `combine` reduces the channel axis (dim 1) to one channel."""
    shape = values.shape[2:]
    out = torch.zeros((values.shape[0], len(offsets), *shape), dtype=torch.float32, device=values.device)
    inside = torch.zeros((len(offsets), *shape), dtype=torch.bool, device=values.device)
    for c, offset in enumerate(offsets):
        here, there = offset_pairs(shape, offset)
        out[(slice(None), c, *here)] = combine(values[(slice(None), slice(None), *here)],
                                               values[(slice(None), slice(None), *there)])
        inside[(c, *here)] = True
    return out, inside.expand(values.shape[0], *inside.shape)


def object_pairs(labels: torch.Tensor, offsets) -> torch.Tensor:
    """(B, len(offsets), z, y, x) bool: both voxels of the pair carry a
    non-zero label (and the partner lies inside)."""
    nonzero, inside = pair_values(labels.unsqueeze(1), offsets, lambda a, b: (a[:, 0] != 0) & (b[:, 0] != 0))
    return (nonzero > 0) & inside


def label_affinities(labels: torch.Tensor, annotated: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth affinities of (B, z, y, x) int64 `labels` by the methods
    notes' definition (1 iff both voxels carry the same non-zero label) and
    their mask: the partner lies inside, and at least one of the two voxels
    is annotated (gunpowder's AddAffinities with an `unlabelled` mask)."""
    stacked = torch.stack([labels, annotated.to(labels.dtype)], dim=1)

    def same(a, b):
        return ((a[:, 0] == b[:, 0]) & (a[:, 0] != 0)).to(torch.float32)

    def either(a, b):
        return ((a[:, 1] != 0) | (b[:, 1] != 0)).to(torch.float32)

    target, inside = pair_values(stacked, offsets, same)
    annotated_pair, _ = pair_values(stacked, offsets, either)
    return target, inside & (annotated_pair > 0)
