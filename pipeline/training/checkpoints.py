"""Training checkpoints: `EXPERIMENT_DIR/model_checkpoint_N`, one file per
saved iteration N, holding everything a resumed run needs to continue as if
it had never stopped: the training step's state (the network, and whatever
the method keeps beside it, such as an EMA teacher), the optimiser, the
random number generators of torch, numpy and Python, and the method's
settings the weights were trained with (a resume under other settings is
refused: the exported model would record settings it was not trained with).

Files of gunpowder's Train node (before affseg's own loop: the network and
optimiser only, under `step.`) are read too, so an experiment started then
resumes; its random state starts afresh from the config's seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

FORMAT = "affseg-training-1"
# gunpowder's Train saved Autocast(step): the step's keys under "step."
_GUNPOWDER_PREFIX = "step."
# the step's network, the exported model
NETWORK_PREFIX = "model."


@dataclass(frozen=True)
class Checkpoint:
    iteration: int
    step: dict
    optimizer: dict
    rng: dict | None  # None: a gunpowder checkpoint, which kept none
    method: dict | None  # the method's settings (None: a gunpowder checkpoint)


def checkpoint_path(experiment: Path, iteration: int) -> Path:
    return experiment / f"model_checkpoint_{iteration}"


def latest_checkpoint(experiment: Path) -> tuple[int, Path] | None:
    """(iteration, path) of the experiment's latest checkpoint."""
    found = []
    for path in experiment.glob("model_checkpoint_*"):
        suffix = path.name.rsplit("_", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found) if found else None


def rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: torch's weights-only
    # loader reads those without an allow-list
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(experiment: Path, iteration: int, step: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    method: dict) -> Path:
    path = checkpoint_path(experiment, iteration)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "iteration": iteration, "step": step.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_state(), "method": method}, tmp)
    tmp.replace(path)  # a crash while saving leaves the previous checkpoint the latest
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Raises UserError, in one line, for a file that cannot be read."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise UserError(f"experiment_dir: {path} cannot be read ({type(e).__name__}); "
                        f"delete it to resume from an earlier one") from e
    iteration = int(path.name.rsplit("_", 1)[1])
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return Checkpoint(data["iteration"], data["step"], data["optimizer"], data["rng"], data.get("method"))
    if isinstance(data, dict) and "model_state_dict" in data:
        step = {k.removeprefix(_GUNPOWDER_PREFIX): v for k, v in data["model_state_dict"].items()}
        return Checkpoint(iteration, step, data["optimizer_state_dict"], None, None)
    raise UserError(f"experiment_dir: {path} is not a training checkpoint; move it out of the experiment")


def check_resumable(checkpoint: Checkpoint, path: Path, step: torch.nn.Module, iterations: int, method: dict) -> None:
    """Refuse, in one line, a resume that torch would turn into a
    size-mismatch traceback (the network or offsets changed since the
    checkpoint), into "iterations 2..1" (fewer iterations than done), or
    that would go on under other method settings than the weights had."""
    experiment = path.parent
    if checkpoint.iteration > iterations:
        raise UserError(f"iterations: {experiment} holds a checkpoint at iteration {checkpoint.iteration}, beyond "
                        f"iterations {iterations}; raise iterations to train on, or use another experiment_dir")
    if checkpoint.method is not None and checkpoint.method != method:
        changed = next(k for k in sorted(set(method) | set(checkpoint.method)) if method.get(k) != checkpoint.method.get(k))
        raise UserError(
            f"method.{changed}: {path.name} was trained with {json.dumps(checkpoint.method.get(changed))}, this config "
            f"gives {json.dumps(method.get(changed))}; use a new experiment_dir (or --init-from its model.pt)"
        )
    expected = {k: tuple(v.shape) for k, v in step.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint.step.items() if isinstance(v, torch.Tensor)}
    if found != expected:
        differs = next((k for k in expected if found.get(k) != expected[k]), None) or next(k for k in found if k not in expected)
        raise UserError(
            f"experiment_dir: {path.name} was trained with another network or offsets than this "
            f"config ({differs.removeprefix(NETWORK_PREFIX)}: {found.get(differs)} there, {expected.get(differs)} "
            f"here); use a new experiment_dir, or --init-from its model.pt where the network is the same"
        )


def network_state(checkpoint: Checkpoint) -> dict:
    """The exported network's weights: the step's `model.` entries."""
    return {k.removeprefix(NETWORK_PREFIX): v for k, v in checkpoint.step.items() if k.startswith(NETWORK_PREFIX)}
