"""The affinity method: the network predicts one affinity per training
offset directly (sigmoid head), trained with the class-weighted MSE of the
methods notes. The model MALA and SuperHuman train."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from networks.losses import WeightedMSELoss
from pipeline.methods.base import ForegroundSettings, MethodModel, MethodStep, Progress, StepOutput, TrainingBatch, foreground_loss
from pipeline.schema import Strict


class Settings(Strict):
    name: Literal["affinity"] = "affinity"
    foreground: ForegroundSettings | None = None


class Model(MethodModel):
    """A 1x1x1 head and a sigmoid on the backbone's features. A backbone
    without `out_channels` already returns affinities (the intensity
    baseline) and gets no head."""

    def __init__(self, backbone: nn.Module, offsets, settings: Settings = Settings()):
        super().__init__(backbone, offsets, settings.foreground)
        channels = getattr(backbone, "out_channels", None)
        self.head = nn.Conv3d(channels, len(self.offsets), 1) if channels is not None else None

    def forward(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(raw)
        if self.head is None:
            return {"affinities": features}
        return {"affinities": torch.sigmoid(self.head(features)), **self.foreground_outputs(features)}

    def affinities(self, outputs: dict[str, torch.Tensor], offsets) -> torch.Tensor:
        channels = [self.offsets.index(tuple(o)) for o in offsets]
        if channels == list(range(len(self.offsets))):
            return outputs["affinities"]  # no copy for the common case
        return outputs["affinities"][:, channels]

    def offsets_error(self, offsets) -> str | None:
        missing = [list(o) for o in offsets if tuple(o) not in self.offsets]
        if missing:
            return (f"an affinity model gives only its training offsets {[list(o) for o in self.offsets]}; "
                    f"not {missing}")
        return None


class TrainingStep(MethodStep):
    def __init__(self, model: Model, settings: Settings):
        super().__init__(model)
        self.settings = settings
        self.loss = WeightedMSELoss()

    def forward(self, batch: TrainingBatch, progress: Progress) -> StepOutput:
        features = self.model.backbone(batch.raw)
        prediction = torch.sigmoid(self.model.head(features))
        losses = {"affinity": self.loss(prediction, batch.affs, batch.affs_mask)}
        if self.model.foreground is not None:
            losses["foreground"] = foreground_loss(self.model.foreground(features), batch.labels, batch.labels_mask,
                                                   self.settings.foreground)
        return StepOutput(losses, {"prediction": prediction})
