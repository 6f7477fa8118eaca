"""Launchers turn a worker into a command: a local subprocess, `sbatch --wait`
or `bsub -K`. They return the command they would run, so tests check cluster
commands without a cluster.

A launcher is the process function of a daisy task. daisy calls it in one of
its worker slots with DAISY_CONTEXT in the environment; the command inherits
that environment (sbatch and bsub export it by default), so the worker at the
far end connects back to the scheduler.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import LauncherConfig, Resources


@dataclass(frozen=True)
class Launcher:
    step: str
    config_path: str
    kind: str
    resources: Resources

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", f"workers.{self.step}", self.config_path]

    def log(self, scheduler: str, job_id_pattern: str, stream: str) -> str:
        """Where a cluster job's own output goes: beside the daisy worker
        logs of its step, one file per job and stream, so that the master
        finds a failed block's exception there."""
        logs = Path(self.config_path).parent / "logs" / self.step
        return str(logs / f"{scheduler}-{job_id_pattern}.{stream}")

    def command(self) -> list[str]:
        worker = self.worker_command()
        r = self.resources
        if self.kind == "local":
            return worker
        if self.kind == "slurm":
            command = [
                "sbatch", "--wait", f"--job-name=affseg-{self.step}", f"--cpus-per-task={r.cpus}",
                f"--mem={int(r.memory_gb * 1024)}M", f"--time={r.time_limit_min}",
                f"--output={self.log('slurm', '%j', 'out')}", f"--error={self.log('slurm', '%j', 'err')}",
            ]
            if r.gpus:
                command.append(f"--gres=gpu:{r.gpus}")
            if r.queue:
                command.append(f"--partition={r.queue}")
            return [*command, "--wrap", shlex.join(worker)]
        command = [
            "bsub", "-K", "-J", f"affseg-{self.step}", "-n", str(r.cpus),
            "-R", f"rusage[mem={int(r.memory_gb * 1024)}]", "-W", str(r.time_limit_min),
            "-o", self.log("lsf", "%J", "out"), "-e", self.log("lsf", "%J", "err"),
        ]
        if r.gpus:
            command += ["-gpu", f"num={r.gpus}"]
        if r.queue:
            command += ["-q", r.queue]
        return [*command, *worker]

    def __call__(self) -> None:
        # a failing worker makes this raise, which daisy counts as a worker
        # failure and answers with a restart, up to the task's limit
        subprocess.run(self.command(), check=True)


def make_launcher(step: str, config_path: str, launcher: LauncherConfig) -> Launcher:
    return Launcher(step, config_path, launcher.kind, launcher.resources.get(step, Resources()))
