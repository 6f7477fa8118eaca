from __future__ import annotations

import sys

from pipeline.config import LauncherConfig, Resources
from pipeline.orchestration.launchers import make_launcher


def test_local_runs_the_worker_module_directly():
    launcher = make_launcher("fragments", "/runs/a/config.json", LauncherConfig())
    assert launcher.command() == [sys.executable, "-m", "workers.fragments", "/runs/a/config.json"]


def test_slurm_waits_and_asks_for_the_step_resources():
    config = LauncherConfig(kind="slurm", resources={"predict": Resources(gpus=1, cpus=4, memory_gb=16, queue="gpu")})
    command = make_launcher("predict", "/r/config.json", config).command()
    assert command[:2] == ["sbatch", "--wait"]
    assert {"--cpus-per-task=4", "--mem=16384M", "--gres=gpu:1", "--partition=gpu"} <= set(command)
    assert command[-2] == "--wrap" and command[-1].endswith("-m workers.predict /r/config.json")
    assert {"--output=/r/logs/predict/slurm-%j.out", "--error=/r/logs/predict/slurm-%j.err"} <= set(command)


def test_lsf_blocks_and_steps_without_resources_get_defaults():
    config = LauncherConfig(kind="lsf", resources={"predict": Resources(gpus=2)})
    command = make_launcher("relabel", "/r/config.json", config).command()
    assert command[:2] == ["bsub", "-K"]
    assert "-gpu" not in command and command[command.index("-n") + 1] == "1"
    assert command[-4:] == [sys.executable, "-m", "workers.relabel", "/r/config.json"]
    assert command[command.index("-o") + 1] == "/r/logs/relabel/lsf-%J.out"
    assert command[command.index("-e") + 1] == "/r/logs/relabel/lsf-%J.err"
