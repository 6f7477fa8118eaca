"""The backbones, by the `name` of a network spec.

A backbone turns raw (B, 1, Z, Y, X) into features (B, F, Z', Y', X') and
reports its `geometry` and `out_channels`; it knows nothing of affinities or
embeddings. The heads, targets and losses belong to a method
(`pipeline/methods/`), which builds its model around a backbone.
"""

from __future__ import annotations

from torch import nn

from networks.intensity_baseline import IntensityAffinities
from networks.mala_unet import MalaUNet, MalaUNetSpec
from networks.residual_unet import ResidualUNet, ResidualUNetSpec

BACKBONES = {
    "mala_unet": (MalaUNet, MalaUNetSpec),
    "residual_unet": (ResidualUNet, ResidualUNetSpec),
}


def _tuples(value):
    """JSON gives lists; the frozen specs hold tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def build_backbone(spec: dict) -> nn.Module:
    spec = dict(spec)
    name = spec.pop("name")
    if name not in BACKBONES:
        raise ValueError(f"unknown network {name!r}")
    network_class, spec_class = BACKBONES[name]
    return network_class(spec_class(**{k: _tuples(v) for k, v in spec.items()}))


def baseline_model(name: str) -> nn.Module:
    if name != "intensity":
        raise ValueError(f"unknown baseline {name!r}")
    return IntensityAffinities().eval()
