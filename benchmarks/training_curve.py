"""Scores of a training run's checkpoints: each `model_checkpoint_N` of the
experiment is exported and run through the main job with RUN_CONFIG (its
model and run_dir replaced), which shows whether a model is still learning.

    python benchmarks/training_curve.py TRAIN_CONFIG RUN_CONFIG [--every N]

Prints one row per checkpoint (the run's score row: VOI, ARAND and, for 2D
runs, AJI, Dice, PQ, SBD, |DiC|) and writes OUT/curve.json beside the runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import load_json  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.loop import export_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/training_curve.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_config", help="the experiment's training config")
    parser.add_argument("run_config", help="a run config (with ground_truth) to score each checkpoint with")
    parser.add_argument("--every", type=int, default=500, help="score checkpoints at multiples of this iteration")
    args = parser.parse_args()
    train = TrainConfig(**load_json(args.train_config))
    run = load_json(args.run_config)
    experiment = Path(train.experiment_dir)
    out = experiment / "curve"
    out.mkdir(exist_ok=True)
    checkpoints = sorted((int(p.name.rsplit("_", 1)[1]), p) for p in experiment.glob("model_checkpoint_*"))
    rows = []
    for iteration, checkpoint in checkpoints:
        if iteration % args.every:
            continue
        model = export_checkpoint(train, checkpoint, out / f"model_{iteration}.pt")
        config = {**run, "run_dir": str(out / f"run_{iteration}"), "model": {**run["model"], "checkpoint": str(model)}}
        path = out / f"run_{iteration}.json"
        path.write_text(json.dumps(config, indent=2))
        subprocess.run([sys.executable, "pipeline/predict.py", str(path)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        row = json.loads((out / f"run_{iteration}" / "report.json").read_text())["scores"][0]
        rows.append({"iteration": iteration, **row})
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    (out / "curve.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    cli_main(main)
