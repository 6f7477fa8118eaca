"""Building, saving and loading affinity models.

A checkpoint holds the architecture spec and the offsets next to the weights,
so `predict` rebuilds exactly the trained network and reads its geometry
from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from networks.intensity_baseline import IntensityAffinities
from networks.mala_unet import MalaUNet, MalaUNetSpec
from networks.residual_unet import ResidualUNet, ResidualUNetSpec

CHECKPOINT_FORMAT = "affseg-model-1"

# the backbones, by the `name` of a network spec
BACKBONES = {
    "mala_unet": (MalaUNet, MalaUNetSpec),
    "residual_unet": (ResidualUNet, ResidualUNetSpec),
}


def _tuples(value):
    """JSON gives lists; the frozen specs hold tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def build_network(spec: dict, offsets: list[tuple[int, int, int]]) -> nn.Module:
    """The backbone `spec["name"]` with one output channel per offset, and
    `.offsets` and `.geometry` set."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in BACKBONES:
        raise ValueError(f"unknown network {name!r}")
    network_class, spec_class = BACKBONES[name]
    net = network_class(spec_class(out_channels=len(offsets), **{k: _tuples(v) for k, v in spec.items()}))
    net.offsets = tuple(tuple(o) for o in offsets)
    return net


def save_model(path: Path, spec: dict, offsets: list, state_dict: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "network": spec, "offsets": offsets, "state_dict": state_dict}, tmp)
    tmp.replace(path)


def load_model(path: str | Path) -> nn.Module:
    """The network in eval mode, with `.offsets` and `.geometry` set."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an affseg model checkpoint (export one with pipeline/train.py)")
    net = build_network(data["network"], data["offsets"])
    net.load_state_dict(data["state_dict"])
    return net.eval()


def baseline_model(name: str) -> nn.Module:
    if name != "intensity":
        raise ValueError(f"unknown baseline {name!r}")
    return IntensityAffinities().eval()
