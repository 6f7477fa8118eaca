"""Which torch device a process uses."""

from __future__ import annotations

from pipeline.errors import UserError


def choose_device(wanted: str, worker_id: int = 0, field: str = "device") -> str:
    """`auto` spreads workers over the GPUs (cuda:{worker_id % n_gpus}) and
    falls back to the CPU; `cuda` insists on a GPU."""
    # imported here: the master imports this module, and a run from given
    # affinities never needs torch (1.2 s of CPU to import)
    import torch

    n_gpus = torch.cuda.device_count()
    if wanted == "cpu" or (wanted == "auto" and n_gpus == 0):
        return "cpu"
    if n_gpus == 0:
        raise UserError(f"{field}: 'cuda' was asked for, but torch sees no CUDA device on this machine; use \"auto\" or \"cpu\"")
    return f"cuda:{worker_id % n_gpus}"
