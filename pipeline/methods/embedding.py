"""Pixel-embedded affinities (PEA, methods notes section A).

The network gives a D-dimensional, L2-normalised embedding per voxel; the
affinity of voxels i and i + o is the cosine of their embeddings, so any
offset's affinity can be read at predict time ("adaptive affinity"). Three
training terms, each one config key:

- SCM: cosine affinities at the training offsets, regressed onto the 0/1
  ground truth with the class-weighted MSE;
- CCM: a second view of the crop (flip/transpose, intensity, cutout) through
  the same network, mapped back by the inverse spatial transform; cross
  affinities <e_i, e'_{i+o}> with the same targets;
- EPM: embedding heads on decoder levels 1/2, 1/4, ..., supervised with
  affinities of nearest-downsampled labels at shrinking offset ranges.

Data with background (nuclei): the foreground head every method offers
(`base.ForegroundSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from networks.losses import WeightedMSELoss
from pipeline.methods.base import (ForegroundSettings, MethodModel, MethodStep, Progress, StepOutput, TrainingBatch,
                                   foreground_loss, label_affinities, object_pairs, pair_values)
from pipeline.schema import Strict

PositiveInt = Annotated[int, Field(gt=0)]


class CCMSettings(Strict):
    """The second view of the cross-correlation term."""

    # (ref. code) detaches the second view; the paper back-propagates both
    stop_gradient: bool = True
    # contrast and brightness change, each uniform in +-intensity
    intensity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # 0..max_cutouts zero-filled boxes of these sizes (voxels, z y x; z is
    # 1 for 2D networks)
    max_cutouts: Annotated[int, Field(ge=0)] = 60
    cutout_size: tuple[tuple[PositiveInt, PositiveInt], tuple[PositiveInt, PositiveInt], tuple[PositiveInt, PositiveInt]] = (
        (5, 10), (10, 20), (10, 20)
    )


class EPMSettings(Strict):
    """Embedding pyramid: one head per decoder level 1/2, 1/4, ...; a level
    is supervised with the training offsets no longer than its range (its
    own voxels), or its nearest neighbours when none is that short."""

    # one range per level, finest first; null: the methods notes' defaults,
    # (9, 5, 3, 1) for 2D networks, nearest neighbours only in 3D
    ranges: list[PositiveInt] | None = None


class Settings(Strict):
    name: Literal["embedding"]
    dim: Annotated[int, Field(gt=1)] = 16
    # the SCM/CCM/EPM losses regress ReLU(cosine) (the paper's intent: an
    # orthogonal pair means "different"); false regresses the raw cosine in
    # [-1, 1] as the published code does. Predict always clamps at 0.
    clamp_negative: bool = True
    scm: bool = True
    ccm: CCMSettings | None = CCMSettings()
    epm: EPMSettings | None = EPMSettings()
    foreground: ForegroundSettings | None = None
    # whether pairs with a background voxel count in the embedding terms.
    # With a foreground head, background is the head's job and false spends
    # the embedding on telling touching objects apart: with true, the
    # background pairs (most of the "different" ones on nuclei) outweigh the
    # few pairs that span two nuclei, and those collapse to one code.
    background_pairs: bool = True

    @model_validator(mode="after")
    def _some_term(self) -> Settings:
        if not (self.scm or self.ccm or self.epm):
            raise ValueError("switch on at least one of scm, ccm and epm")
        if not self.background_pairs and self.foreground is None:
            raise ValueError("background_pairs: false needs a foreground head (set foreground: {})")
        return self


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def cosine_affinities(embedding: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """<e_i, e_{i+o}> of L2-normalised (B, D, z, y, x) embeddings, and the
    mask of pairs whose partner lies inside."""
    return pair_values(embedding, offsets, _dot)


def cross_affinities(embedding: torch.Tensor, other: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """<e_i, e'_{i+o}>: the first view's embedding against the second's."""
    dim = embedding.shape[1]
    return pair_values(torch.cat([embedding, other], dim=1), offsets, lambda a, b: _dot(a[:, :dim], b[:, dim:]))


def nearest_downsample(volume: torch.Tensor, factor) -> torch.Tensor:
    """The voxel nearest each cell's centre, for (B, z, y, x) labels or
    masks whose spatial shape is a multiple of `factor`."""
    return volume[(slice(None), *(slice(f // 2, None, f) for f in factor))]


def level_offsets(offsets, limit: int) -> list[tuple[int, int, int]]:
    """The training offsets no longer than `limit` on every axis, or the
    nearest neighbours of the training offsets' axes when none is."""
    short = [tuple(o) for o in offsets if max(abs(x) for x in o) <= limit]
    if short:
        return short
    return [o for o in ((-1, 0, 0), (0, -1, 0), (0, 0, -1)) if any(o[a] and any(t[a] for t in offsets) for a in range(3))]


def embedding_reach(offsets) -> tuple[int, int, int]:
    """Embedding voxels needed beyond a block: the longest offset per axis."""
    return tuple(max(abs(o[axis]) for o in offsets) for axis in range(3))


def embedding_offsets_error(planar: bool, offsets) -> str | None:
    """Any offset is a cosine of two embeddings; a 2D network's stay in-plane."""
    if planar and any(o[0] for o in offsets):
        return "a 2D embedding model gives in-plane offsets only"
    return None


@dataclass(frozen=True)
class SecondView:
    """One random spatial transform (flips, then a y-x transpose) with its
    inverse, and the photometric changes of CCM's second view."""

    flips: tuple[int, ...]  # tensor dims to flip
    transpose: bool
    contrast: float
    brightness: float
    cutouts: tuple[tuple[slice, slice, slice], ...]

    @classmethod
    def draw(cls, shape, settings: CCMSettings, planar: bool, generator: torch.Generator | None = None) -> SecondView:
        def uniform(low: float, high: float) -> float:
            return float(torch.empty(()).uniform_(low, high, generator=generator))

        axes = (3, 4) if planar else (2, 3, 4)
        flips = tuple(a for a in axes if uniform(0, 1) < 0.5)
        transpose = shape[3] == shape[4] and uniform(0, 1) < 0.5
        cutouts = []
        for _ in range(int(torch.randint(0, settings.max_cutouts + 1, (), generator=generator))):
            box = []
            for axis, (low, high) in enumerate(settings.cutout_size):
                size = 1 if planar and axis == 0 else int(torch.randint(low, high + 1, (), generator=generator))
                size = min(size, shape[2 + axis])
                start = int(torch.randint(0, shape[2 + axis] - size + 1, (), generator=generator))
                box.append(slice(start, start + size))
            cutouts.append(tuple(box))
        i = settings.intensity
        return cls(flips, transpose, 1 + uniform(-i, i), uniform(-i, i), tuple(cutouts))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        if self.flips:
            x = x.flip(self.flips)
        return x.transpose(3, 4) if self.transpose else x

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `spatial`: transpose back, then flip back."""
        if self.transpose:
            x = x.transpose(3, 4)
        return x.flip(self.flips) if self.flips else x

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        view = self.spatial(raw) * self.contrast + self.brightness
        if self.cutouts:
            view = view.clone()
            for box in self.cutouts:
                view[(..., *box)] = 0
        return view


class Model(MethodModel):
    def __init__(self, backbone: nn.Module, offsets, settings: Settings):
        super().__init__(backbone, offsets, settings.foreground)
        self.settings = settings
        self.planar = all(o[0] == 0 for o in self.offsets)
        self.embed = nn.Conv3d(backbone.out_channels, settings.dim, 1)
        self.pyramid = nn.ModuleList()
        self.level_ranges: tuple[int, ...] = ()
        if settings.epm is not None:
            factors = getattr(backbone, "level_factors", ())
            if not factors:
                raise ValueError("method.epm needs a backbone with decoder levels (residual_unet); set it to null")
            ranges = settings.epm.ranges or ([9, 5, 3, 1] if self.planar else [1] * len(factors))
            if len(ranges) > len(factors):
                raise ValueError(f"method.epm.ranges has {len(ranges)} levels, the backbone {len(factors)}")
            crop = backbone.spec.crop
            for factor in factors[: len(ranges)]:
                if any(c % f for c, f in zip(crop, factor)):
                    raise ValueError(f"method.epm: the backbone's crop {tuple(crop)} must be a multiple of each "
                                     f"level's downsampling, here {factor}")
            self.level_ranges = tuple(ranges)
            self.pyramid = nn.ModuleList(nn.Conv3d(w, settings.dim, 1) for w in backbone.level_widths[: len(ranges)])

    def embeddings(self, raw: torch.Tensor, levels: bool = False):
        """(embedding, [level embeddings], foreground logits or None)."""
        if levels and self.pyramid:
            features, *coarse = self.backbone(raw, levels=True)
            pyramid = [F.normalize(head(f), dim=1) for head, f in zip(self.pyramid, coarse)]
        else:
            features, pyramid = self.backbone(raw), []
        embedding = F.normalize(self.embed(features), dim=1)
        logits = self.foreground(features) if self.foreground is not None else None
        return embedding, pyramid, logits

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding, _, logits = self.embeddings(raw)
        if logits is None:
            return {"embedding": embedding}
        return {"embedding": embedding, "foreground": self.foreground_probability(logits)}

    def affinities(self, outputs: dict[str, torch.Tensor], offsets) -> torch.Tensor:
        # the paper's intent: orthogonal (or opposite) embeddings mean "different"
        return cosine_affinities(outputs["embedding"], offsets)[0].clamp(min=0)

    def reach(self, offsets) -> tuple[int, int, int]:
        return embedding_reach(offsets)

    def offsets_error(self, offsets) -> str | None:
        return embedding_offsets_error(self.planar, offsets)

    def outputs(self, offsets) -> dict[str, tuple[int, str]]:
        return {"embedding": (self.settings.dim, "float16"), **super().outputs(offsets)}


class TrainingStep(MethodStep):
    """SCM + CCM + one EPM term per level (+ foreground), all weights 1."""

    def __init__(self, model: Model, settings: Settings):
        super().__init__(model)
        self.settings = settings
        self.mse = WeightedMSELoss()

    def _fit(self, cosines: torch.Tensor) -> torch.Tensor:
        return cosines.clamp(min=0) if self.settings.clamp_negative else cosines

    def forward(self, batch: TrainingBatch, progress: Progress) -> StepOutput:
        s, offsets, raw, labels = self.settings, self.model.offsets, batch.raw, batch.labels
        embedding, pyramid, logits = self.model.embeddings(raw, levels=s.epm is not None)
        cosines, inside = cosine_affinities(embedding, offsets)
        # targets of pairs that reach beyond the output exist (gunpowder reads
        # labels beyond it) but the embedding there does not
        mask = batch.affs_mask * inside
        if not s.background_pairs:
            mask = mask * object_pairs(labels, offsets)
        losses = {}
        if s.scm:
            losses["scm"] = self.mse(self._fit(cosines), batch.affs, mask)
        if s.ccm is not None:
            view = SecondView.draw(raw.shape, s.ccm, self.model.planar)
            other = view.undo(self.model.embeddings(view.apply(raw))[0])
            if s.ccm.stop_gradient:
                other = other.detach()
            cross, _ = cross_affinities(embedding, other, offsets)
            losses["ccm"] = self.mse(self._fit(cross), batch.affs, mask)
        for level, (coarse, limit) in enumerate(zip(pyramid, self.model.level_ranges)):
            factor = self.model.backbone.level_factors[level]
            level_labels = nearest_downsample(labels, factor)
            chosen = level_offsets(offsets, limit)
            target, valid = label_affinities(level_labels, nearest_downsample(batch.labels_mask, factor), chosen)
            if not s.background_pairs:
                valid = valid & object_pairs(level_labels, chosen)
            losses[f"epm_{level + 1}"] = self.mse(self._fit(cosine_affinities(coarse, chosen)[0]), target, valid)
        if logits is not None:
            losses["foreground"] = foreground_loss(logits, labels, batch.labels_mask, s.foreground)
        return StepOutput(losses, {"prediction": cosines.clamp(min=0)})
