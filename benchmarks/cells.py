"""What the training benchmarks share (benchmarks/sparse_nuclei.py,
benchmarks/latent_masks_table.py): a table of cells, each a model trained
and scored, that resumes across sessions.

A cell whose scores are in the results file is not redone (`--redo TEXT`
redoes the cells whose name holds the text), a finished training is
reused, an interrupted one goes on from its checkpoint; `--only` limits
the work to the cells whose name holds one of the texts. Each cell records
its training wall and CPU time, the machine and the date, so a table
measured over several sessions says where each figure came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.config import load_json
from pipeline.storage.files import write_atomically
from pipeline.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def table_main(prog: str, doc: str, default_config: str, config_class, results_name: str,
               runners: Callable, tables: Callable, shown: tuple[str, ...]) -> None:
    """A table benchmark's command: parses CONFIG (a `config_class`) and
    the cell options, runs `runners(config)`'s cells not yet done, writes
    the results file OUT_DIR/`results_name` and `tables(config, results)`
    beside it as .md, and prints them."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(REPO / default_config))
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the cells whose name holds one of these texts")
    parser.add_argument("--redo", nargs="+", metavar="TEXT", default=[],
                        help="score again (and train, where no model is left) the stored cells whose name holds one of these texts")
    parser.add_argument("--results", type=Path, help=f"the results file to continue (default OUT_DIR/{results_name})")
    args = parser.parse_args()
    config = config_class(**load_json(args.config))
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    stored = args.results or Path(config.out_dir) / results_name
    started = time.time()
    results = run_cells(runners(config), stored, args, shown)
    text = tables(config, results)
    stored.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"total {time.time() - started:.0f} s; wrote {stored} and {stored.with_suffix('.md')}")


def run_cells(cells: Iterable[tuple[str, Callable[[], dict]]], stored: Path, args: argparse.Namespace,
              shown: tuple[str, ...]) -> dict[str, dict]:
    """Runs the cells (name, what scores it) not yet in the results file
    `stored`, saving it after each; the results of every cell."""
    results = load_json(str(stored)) if stored.exists() else {}
    for name, run in cells:
        if args.only and not any(text in name for text in args.only):
            continue
        if name in results and not any(text in name for text in args.redo):
            continue
        print(f"{name} ...", flush=True)
        cell = run()
        # the file as it is now, plus this cell: a cell takes an hour, and
        # the file may have been edited (or another cell stored) meanwhile
        results = {**(load_json(str(stored)) if stored.exists() else {}), name: cell}
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(stored, json.dumps(results, indent=2))
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in cell.items() if k in shown), flush=True)
    return results


def summary(rows: list[dict], keys: tuple[str, ...]) -> str:
    """One table cell: the mean of each score in `keys`, and with several
    seeds the half range (n seeds)."""
    if not rows:
        return "not run"
    parts = []
    for key in keys:
        values = [r[key] for r in rows]
        spread = f" ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
        parts.append(f"{key.upper()} {statistics.mean(values):.3f}{spread}")
    seeds = f" ({len(rows)} seeds)" if len(rows) > 1 else ""
    return ", ".join(parts) + seeds


def train(cell: Path, base: Path, changes: dict) -> tuple[Path, float | None, float | None]:
    """Trains (or resumes) the cell's model; (model file, training wall
    seconds and CPU seconds, each summed over every invocation that
    trained, None if one was interrupted or not measured: unknown). A cell whose changes are the config's
    own values trains in the config's experiment_dir (the bundled CRAC model
    is the 10% cell's)."""
    data = load_json(str(base))
    config = base
    # compared as parsed configs: paths are made absolute there
    if TrainConfig(**{**data, **changes}) != TrainConfig(**data):
        data = {**data, **changes, "experiment_dir": str(cell / "train")}
        config = cell / "train.json"
        cell.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(data, indent=2))
    experiment = Path(TrainConfig(**load_json(str(config))).experiment_dir)
    ledger, cpu_ledger = experiment / "wall_s.json", experiment / "cpu_s.json"
    walls = json.loads(ledger.read_text()) if ledger.exists() else []
    cpus = json.loads(cpu_ledger.read_text()) if cpu_ledger.exists() else [None] * len(walls)
    model = experiment / "model.pt"
    if not model.exists():
        # null until this invocation ends: a killed one stays null
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps(walls + [None]))
        cpu_ledger.write_text(json.dumps(cpus + [None]))
        started, cpu_started = time.time(), children_cpu_s()
        subprocess.run([sys.executable, "pipeline/train.py", str(config)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        walls.append(round(time.time() - started))
        cpus.append(round(children_cpu_s() - cpu_started))
        ledger.write_text(json.dumps(walls))
        cpu_ledger.write_text(json.dumps(cpus))
    return model, None if None in walls else float(sum(walls)), None if None in cpus else float(sum(cpus))


def children_cpu_s() -> float:
    """CPU seconds of the finished child processes (training's), which,
    unlike its wall time, neither other work on the machine nor a pause
    (SIGSTOP) of the training stretches."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured() -> dict:
    return {"machine": machine(), "date": datetime.date.today().isoformat()}


def machine() -> str:
    """The machine a training ran on, in words: wall times of cells trained
    on different machines are not comparable, so each cell names its own."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} cores {cpu}{gpu}"
