"""The methods, one module each (`base.py` says what a method provides),
and the model files that record them.

A model file holds the method with its settings, the backbone spec, the
training offsets and the weights, so a run config names only the file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from networks.models import baseline_model, build_backbone
from pipeline.methods import affinity, crac, embedding, latent_masks
from pipeline.methods.base import MethodModel, MethodStep

METHODS = {"affinity": affinity, "embedding": embedding, "crac": crac, "latent_masks": latent_masks}

# the `method` section of a training config
MethodConfig = Annotated[affinity.Settings | embedding.Settings | crac.Settings | latent_masks.Settings,
                         Field(discriminator="name")]

CHECKPOINT_FORMAT = "affseg-model-2"
# before methods: the affinity method, the head inside the backbone
_FORMAT_1 = "affseg-model-1"


def build_model(method, backbone: dict, offsets) -> MethodModel:
    """The method's model around a fresh backbone; `method` is its Settings."""
    model = METHODS[method.name].Model(build_backbone(backbone), offsets, method)
    model.method = method
    return model


def training_step(model: MethodModel, method) -> MethodStep:
    """The method's training step around `model` (see `base.MethodStep`)."""
    return METHODS[method.name].TrainingStep(model, method)


def baseline(name: str) -> MethodModel:
    """The no-network baseline as an affinity model."""
    network = baseline_model(name)
    return affinity.Model(network, network.offsets)


def save_model(path: Path, method, backbone: dict, offsets, state_dict: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "method": method.model_dump(mode="json"),
        "backbone": backbone,
        "offsets": [list(o) for o in offsets],
        "state_dict": state_dict,
    }, tmp)
    tmp.replace(path)


def _from_format_1(data: dict) -> dict:
    """A model file from before methods: its head was the backbone's `head`."""
    state = {k if k.startswith("head.") else f"backbone.{k}": v for k, v in data["state_dict"].items()}
    # a 2D backbone's head was a 2D convolution; the method's head is 1x1x1
    state = {k: v[:, :, None] if k == "head.weight" and v.dim() == 4 else v for k, v in state.items()}
    return {"method": {"name": "affinity"}, "backbone": data["network"], "offsets": data["offsets"], "state_dict": state}


def load_model(path: str | Path) -> MethodModel:
    """The model in eval mode, with `.offsets` and `.geometry` set. Raises
    ValueError, in one line, for a file that is not an affseg model."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a readable archive that the weights-only loader refuses holds code
        if zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} holds Python objects besides weights; affseg loads weights only and refuses it"
            ) from e
        raise ValueError(f"{path} is not a model file (not a PyTorch archive)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable model file (empty, truncated or corrupt)") from e
    if isinstance(data, dict) and data.get("format") == _FORMAT_1:
        data = _from_format_1(data)
    elif not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an affseg model file (export one with pipeline/train.py)")
    name = data["method"].get("name")
    if name not in METHODS:
        raise ValueError(f"{path}: unknown method {name!r}")
    method = METHODS[name].Settings(**data["method"])
    model = build_model(method, data["backbone"], data["offsets"])
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as e:
        raise ValueError(
            f"{path}: its weights do not fit the network it records ({len(data['offsets'])} offsets, "
            f"{data['backbone'].get('name')}): the file was edited or assembled by hand"
        ) from e
    return model.eval()
