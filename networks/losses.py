"""Losses for affinity training."""

from __future__ import annotations

import torch


def class_balance_weights(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per channel, f = fraction of positive pairs among the valid ones,
    clipped to [0.05, 0.99]; the minority class gets weight (1-f)/f or
    f/(1-f), the majority class 1 (the methods notes' definition)."""
    dims = (0, *range(2, target.dim()))
    valid = mask.sum(dim=dims, keepdim=True).clamp(min=1)
    f = ((target * mask).sum(dim=dims, keepdim=True) / valid).clamp(0.05, 0.99)
    positive_weight = torch.where(f < 0.5, (1 - f) / f, torch.ones_like(f))
    negative_weight = torch.where(f > 0.5, f / (1 - f), torch.ones_like(f))
    return torch.where(target > 0.5, positive_weight, negative_weight)


class WeightedMSELoss(torch.nn.Module):
    """Sum of w * (p - t)^2 over the valid pairs, divided by their number;
    `channel_weights` (one per channel) multiply w (CRAC's x10 on the
    nearest neighbours)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                channel_weights: torch.Tensor | None = None) -> torch.Tensor:
        mask = mask.to(prediction.dtype)
        target = target.to(prediction.dtype)
        weights = class_balance_weights(target, mask) * mask
        if channel_weights is not None:
            weights = weights * channel_weights.to(weights).view(1, -1, *(1,) * (weights.dim() - 2))
        return (weights * (prediction - target) ** 2).sum() / mask.sum().clamp(min=1)
