"""The no-network baseline: nearest-neighbour affinities from raw intensity.

In EM, membranes are dark, so the affinity between two neighbours is the
darker of their two normalised intensities. Running the main job with this
"model" gives the score a trained network has to beat clearly.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.geometry import Geometry

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


class IntensityAffinities(nn.Module):
    def __init__(self):
        super().__init__()
        # one voxel of context on each side covers every nearest neighbour
        self.geometry = Geometry(axis_output=lambda n, axis: n - 2 if n > 2 else None, alignment=(1, 1, 1))
        self.offsets = OFFSETS

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        inner = raw[..., 1:-1, 1:-1, 1:-1]
        shifted = (raw[..., :-2, 1:-1, 1:-1], raw[..., 1:-1, :-2, 1:-1], raw[..., 1:-1, 1:-1, :-2])
        return torch.cat([torch.minimum(inner, s) for s in shifted], dim=1)
