"""Cross-representation affinity consistency (CRAC, methods notes section B):
learning from a few annotated instances.

Two networks on two backbones of one spec, trained together by one
optimiser: E, an embedding whose cosines are affinities (PEA's SCM; this
model's `backbone` and `embed`), and F, explicit affinities (`explicit`, an
affinity-method model). Each batch splits the pairs of the training offsets
into three (`pair_regions`):

- M, supervised: every pair whose ground truth the annotation determines,
  i.e. with a voxel annotated. On data without background (EM) that is the
  notes' M, the pairs starting inside an annotated instance and its
  ground-truth boundary pairs. With known background (nuclei) it also
  holds the pairs of a background voxel and any other (never the same
  object): the borders of the unannotated nuclei against the background,
  which the masked-loss and PEA methods train on too. Both
  representations are regressed onto the ground truth there, with the
  class-weighted MSE times `supervised_weight`, the nearest-neighbour
  channels times `nearest_weight` more. With `background_pairs: false` (as
  PEA's, and like it for E only) E's supervised pairs are those of M with
  a voxel in an annotated instance and none of known background: the
  foreground head learns the background, and the embedding is spent on
  telling nuclei apart (the background pairs outnumber the pairs that
  span two nuclei, and spend the class balance). F, explicit affinities
  like the affinity method's, trains on all of M either way.
- P, unlabelled: pairs of two unannotated voxels, the rest. Each
  representation is regressed onto the other (the teacher) where the
  teacher is confident: the alpha_t most uncertain fraction of P's pairs,
  by binary entropy, is dropped (`confident`), alpha_t = alpha_0 (1 - t /
  T)^1.5.

The teacher is the live networks (its prediction detached, as in the paper,
or not, as in the published code) or an EMA copy of both. The ground truth
the step uses is made from the labels inside the annotation mask only, so
no unannotated instance can reach the loss.

Inference reads E's cosine affinities (any offset, as PEA) or F's
(its training offsets): the run config's `model.representation`.

CPSN, the learned error filter of the notes, is not built: it trains a third
network on error maps from snapshots of an earlier sparse run (100k
iterations in the paper), beyond this project's CPU budget; the entropy
filter is the one the notes keep always on.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from networks.losses import WeightedMSELoss
from pipeline.methods import affinity
from pipeline.methods.base import (ForegroundSettings, MethodModel, MethodStep, Progress, StepOutput, TrainingBatch,
                                   foreground_loss, label_affinities, pair_values)
from pipeline.methods.embedding import cosine_affinities, embedding_offsets_error, embedding_reach
from pipeline.schema import Strict

EMBEDDING, EXPLICIT = "embedding", "explicit"


class EntropySettings(Strict):
    """Drop the alpha_t most uncertain fraction of the unlabelled pairs,
    alpha_t = alpha (1 - t / horizon)^1.5, 0 from `horizon` on."""

    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.005
    # T of the notes (the paper: its planned total). Its own setting, not
    # `iterations`, which users raise to train on
    horizon: Annotated[int, Field(gt=0)]


class EMASettings(Strict):
    """The teacher is an exponential moving average of both networks,
    updated after every optimiser step: teacher <- decay teacher + (1 - decay) live."""

    decay: Annotated[float, Field(gt=0, lt=1)] = 0.99


class Settings(Strict):
    name: Literal["crac"]
    # E's embedding size
    dim: Annotated[int, Field(gt=1)] = 16
    supervised_weight: Annotated[float, Field(gt=0)] = 10.0
    # the nearest-neighbour channels' extra factor in the supervised loss
    nearest_weight: Annotated[float, Field(gt=0)] = 10.0
    pseudo_weight: Annotated[float, Field(ge=0)] = 1.0
    # required: {"horizon": T} (with alpha), or null for no filter (ablation)
    entropy: EntropySettings | None
    # the paper: the teacher's prediction is a fixed target; false lets the
    # pseudo loss's gradients into the teacher too (the published code)
    detach_teacher: bool = True
    # null: the live networks teach each other
    ema: EMASettings | None = None
    foreground: ForegroundSettings | None = None
    # as PEA's, for E: false leaves the pairs with a known-background voxel
    # out of E's supervised pairs (the foreground head's business), so those
    # that say "different" are between an annotated instance and another
    # object. F trains on every pair the annotation determines either way
    background_pairs: bool = True

    @model_validator(mode="after")
    def _teacher(self) -> Settings:
        if self.ema is not None and not self.detach_teacher:
            raise ValueError("an EMA teacher takes no gradients; detach_teacher: false needs ema: null")
        if not self.background_pairs and self.foreground is None:
            raise ValueError("background_pairs: false needs a foreground head (set foreground: {})")
        return self


def alpha_at(settings: EntropySettings, iteration: int) -> float:
    return settings.alpha * max(0.0, 1 - iteration / settings.horizon) ** 1.5


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def confident(p: torch.Tensor, candidates: torch.Tensor, alpha: float) -> torch.Tensor:
    """`candidates` without the floor(alpha n) of them whose prediction `p`
    has the highest binary entropy (n: the candidates of the whole batch)."""
    entropy = binary_entropy(p.detach())[candidates]
    dropped = int(alpha * entropy.numel())
    kept = candidates.clone()
    if dropped:
        worst = torch.topk(entropy, dropped).indices
        flat = kept.view(-1)  # candidates' positions, in the order boolean indexing gives them
        flat[candidates.view(-1).nonzero().squeeze(1)[worst]] = False
    return kept


def pair_regions(annotated: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, P), each (B, len(offsets), z, y, x) bool over the pairs whose
    partner lies inside: M the pairs with an annotated voxel (an annotated
    instance's or known background), P the pairs of two unannotated voxels."""
    unannotated = (annotated == 0).to(torch.float32).unsqueeze(1)
    both, inside = pair_values(unannotated, offsets, lambda a, b: a[:, 0] * b[:, 0])
    unlabelled = (both > 0) & inside
    return inside & ~unlabelled, unlabelled


def instance_pairs(labels: torch.Tensor, annotated: torch.Tensor, offsets) -> torch.Tensor:
    """The pairs with a voxel in an annotated instance and none of known
    background (E's supervised pairs without `background_pairs`)."""
    instance = ((labels != 0) & (annotated != 0)).to(torch.float32)
    background = ((labels == 0) & (annotated != 0)).to(torch.float32)
    stacked = torch.stack([instance, background], dim=1)
    in_instance, inside = pair_values(stacked, offsets, lambda a, b: ((a[:, 0] + b[:, 0]) > 0).float())
    touching, _ = pair_values(stacked, offsets, lambda a, b: ((a[:, 1] + b[:, 1]) > 0).float())
    return (in_instance > 0) & (touching == 0) & inside


def nearest_channels(offsets) -> torch.Tensor:
    """1 for each offset one voxel long (the nearest neighbours), else 0."""
    return torch.tensor([float(sum(abs(x) for x in o) == 1) for o in offsets])


class Model(MethodModel):
    representations = (EMBEDDING, EXPLICIT)

    def __init__(self, backbone: nn.Module, offsets, settings: Settings):
        super().__init__(backbone, offsets, settings.foreground)
        self.settings = settings
        self.planar = all(o[0] == 0 for o in self.offsets)
        self.embed = nn.Conv3d(backbone.out_channels, settings.dim, 1)
        # a second backbone of the same spec, its own initial weights
        self.explicit = affinity.Model(type(backbone)(backbone.spec), offsets,
                                       affinity.Settings(foreground=settings.foreground))
        self.representation = EMBEDDING

    def implicit(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """E: (L2-normalised embedding, foreground logits or None)."""
        features = self.backbone(raw)
        logits = self.foreground(features) if self.foreground is not None else None
        return F.normalize(self.embed(features), dim=1), logits

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.representation == EXPLICIT:
            return self.explicit(raw)
        embedding, logits = self.implicit(raw)
        if logits is None:
            return {"embedding": embedding}
        return {"embedding": embedding, "foreground": self.foreground_probability(logits)}

    def affinities(self, outputs: dict[str, torch.Tensor], offsets) -> torch.Tensor:
        if self.representation == EXPLICIT:
            return self.explicit.affinities(outputs, offsets)
        return cosine_affinities(outputs["embedding"], offsets)[0].clamp(min=0)

    def reach(self, offsets) -> tuple[int, int, int]:
        return self.explicit.reach(offsets) if self.representation == EXPLICIT else embedding_reach(offsets)

    def offsets_error(self, offsets) -> str | None:
        if self.representation == EXPLICIT:
            return self.explicit.offsets_error(offsets)
        return embedding_offsets_error(self.planar, offsets)

    def outputs(self, offsets) -> dict[str, tuple[int, str]]:
        if self.representation == EXPLICIT:
            return self.explicit.outputs(offsets)
        return {"embedding": (self.settings.dim, "float16"), **super().outputs(offsets)}


class TrainingStep(MethodStep):
    """Terms: supervised_implicit, supervised_explicit, pseudo_implicit (E
    taught by F), pseudo_explicit (F taught by E), and with a foreground
    head foreground and foreground_explicit (one head per network, so
    either representation predicts alone)."""

    def __init__(self, model: Model, settings: Settings):
        super().__init__(model)
        self.settings = settings
        self.mse = WeightedMSELoss()
        self.register_buffer("channel_weights", 1 + (settings.nearest_weight - 1) * nearest_channels(model.offsets),
                             persistent=False)
        # the EMA teacher: a copy of both networks, checkpointed, never optimised
        self.teacher = None
        if settings.ema is not None:
            self.teacher = copy.deepcopy(model)
            self.teacher.requires_grad_(False)

    @staticmethod
    def _predict(model: Model, raw: torch.Tensor):
        """(E's ReLU(cosine) affinities, F's affinities, E's logits, F's features)."""
        embedding, logits = model.implicit(raw)
        implicit = cosine_affinities(embedding, model.offsets)[0].clamp(min=0)
        features = model.explicit.backbone(raw)
        return implicit, torch.sigmoid(model.explicit.head(features)), logits, features

    def forward(self, batch: TrainingBatch, progress: Progress) -> StepOutput:
        s, model = self.settings, self.model
        implicit, explicit, logits, features = self._predict(model, batch.raw)
        annotated = batch.labels_mask
        # the ground truth of annotated instances only: nothing outside the
        # annotation (whatever its labels) reaches the supervised terms
        target, _ = label_affinities(batch.labels * (annotated != 0), annotated, model.offsets)
        supervised, unlabelled = pair_regions(annotated, model.offsets)
        implicit_supervised = supervised if s.background_pairs else instance_pairs(batch.labels, annotated, model.offsets)
        if self.teacher is not None:
            with torch.no_grad():
                teach_implicit, teach_explicit, _, _ = self._predict(self.teacher, batch.raw)
        elif s.detach_teacher:
            teach_implicit, teach_explicit = implicit.detach(), explicit.detach()
        else:
            teach_implicit, teach_explicit = implicit, explicit
        alpha = alpha_at(s.entropy, progress.iteration) if s.entropy is not None else 0.0
        by_explicit = confident(teach_explicit, unlabelled, alpha)
        by_implicit = confident(teach_implicit, unlabelled, alpha)
        w = self.channel_weights
        losses = {
            "supervised_implicit": s.supervised_weight * self.mse(implicit, target, implicit_supervised, w),
            "supervised_explicit": s.supervised_weight * self.mse(explicit, target, supervised, w),
            "pseudo_implicit": s.pseudo_weight * self.mse(implicit, teach_explicit, by_explicit),
            "pseudo_explicit": s.pseudo_weight * self.mse(explicit, teach_implicit, by_implicit),
        }
        if logits is not None:
            losses["foreground"] = foreground_loss(logits, batch.labels, annotated, s.foreground)
            losses["foreground_explicit"] = foreground_loss(model.explicit.foreground(features), batch.labels,
                                                            annotated, s.foreground)
        return StepOutput(losses, {"implicit": implicit, "explicit": explicit, "pseudo_pairs": by_explicit.float()},
                          {"alpha": alpha, "unlabelled_pairs": float(unlabelled.float().mean()),
                           "supervised_pairs": float(supervised.float().mean())})

    def after_update(self, progress: Progress) -> None:
        if self.teacher is None:
            return
        decay = self.settings.ema.decay
        with torch.no_grad():
            for teacher, live in zip(self.teacher.parameters(), self.model.parameters()):
                teacher.mul_(decay).add_(live, alpha=1 - decay)
            # BatchNorm statistics follow the live networks
            for teacher, live in zip(self.teacher.buffers(), self.model.buffers()):
                teacher.copy_(live)
