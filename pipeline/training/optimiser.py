"""The optimiser of a training config and its learning-rate schedule.

The schedule is a pure function of the iteration, set on the optimiser
before every step: a resumed run follows it exactly without a scheduler
state, and a changed config takes effect on resume.
"""

from __future__ import annotations

import math

import torch

from pipeline.training.config import OptimizerConfig, ScheduleConfig


def build_optimizer(config: OptimizerConfig, parameters) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.name]
    return kind(parameters, **hyperparameters(config))


def hyperparameters(config: OptimizerConfig) -> dict:
    return {"lr": config.learning_rate, "betas": tuple(config.betas), "eps": config.eps,
            "weight_decay": config.weight_decay, "amsgrad": config.amsgrad}


def apply_config(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> None:
    """The config's settings over those a loaded optimiser state brought
    (torch restores a checkpoint's betas, eps, ... with its moments)."""
    for group in optimizer.param_groups:
        group.update(hyperparameters(config))


def learning_rate(iteration: int, base: float, schedule: ScheduleConfig | None) -> float:
    """The rate of the step after `iteration` updates."""
    if schedule is None:
        return base
    if iteration < schedule.warmup:
        return base * (iteration + 1) / schedule.warmup
    if schedule.decay == "constant":
        return base
    progress = min(1.0, (iteration - schedule.warmup) / (schedule.until - schedule.warmup))
    shape = 1 - progress if schedule.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return base * (schedule.final + (1 - schedule.final) * shape)
