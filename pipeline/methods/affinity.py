"""The affinity method: the network predicts one affinity per training
offset directly (sigmoid head), trained with the class-weighted MSE of the
methods notes. The model MALA and SuperHuman train."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from networks.losses import WeightedMSELoss
from pipeline.methods.base import ForegroundSettings, MethodModel, foreground_loss
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


class TrainingStep(nn.Module):
    def __init__(self, model: Model, settings: Settings):
        super().__init__()
        self.model, self.settings = model, settings
        self.loss = WeightedMSELoss()

    def forward(self, raw, labels, labels_mask, affs, affs_mask) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(raw)
        prediction = torch.sigmoid(self.model.head(features))
        loss = self.loss(prediction, affs, affs_mask)
        if self.model.foreground is not None:
            loss = loss + foreground_loss(self.model.foreground(features), labels.to(torch.int64), labels_mask,
                                          self.settings.foreground)
        return prediction, loss
