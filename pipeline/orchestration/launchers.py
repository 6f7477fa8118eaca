"""Launchers turn a worker into a command: a local subprocess, `sbatch --wait`
or `bsub -K`. They return the command they would run, so tests check cluster
commands without a cluster.

A launcher is the process function of a daisy task. daisy calls it in one of
its worker slots with DAISY_CONTEXT in the environment; the command inherits
that environment (sbatch and bsub export it by default), so the worker at the
far end connects back to the scheduler.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import LauncherConfig, Resources
from pipeline.orchestration.in_process import InProcessStep


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
        returncode = subprocess.run(self.command()).returncode
        if returncode == 0:
            return
        # a worker killed (a signal, out of memory) or failed: recorded for
        # the run's report, where daisy's own restart count can miss it,
        # and said in one line (the worker's own traceback, if any, is in
        # its log). Exiting non-zero is what makes daisy count the failure
        # and start another worker, up to the task's limit.
        cause = f"died of {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with code {returncode}"
        with open(failed_workers_log(Path(self.config_path).parent / "logs", self.step), "a") as log:
            log.write(json.dumps({"t": time.time(), "cause": cause}) + "\n")
        print(f"affseg: a {self.step} worker {cause}; its block is retried", file=sys.stderr)
        raise SystemExit(1)


def failed_workers_log(logs: Path, step: str) -> Path:
    """One JSON line per worker of `step` that died or failed."""
    return logs / step / "failed_workers.jsonl"


def failed_workers(logs: Path, step: str) -> int:
    path = failed_workers_log(logs, step)
    return len(path.read_text().splitlines()) if path.exists() else 0


def make_launcher(step: str, config_path: str, launcher: LauncherConfig) -> Launcher | InProcessStep:
    """A daisy task's process function: a worker command, or for the
    in_process kind a block function of the master's."""
    if launcher.kind == "in_process":
        return InProcessStep(step, config_path)
    return Launcher(step, config_path, launcher.kind, launcher.resources.get(step, Resources()))
