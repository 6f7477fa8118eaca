"""Accuracy benchmark: train (or load) a model, run the main job on held-out
parts of the bundled data, and tabulate the scores.

    python benchmarks/accuracy.py CONFIG        (make accuracy: configs/accuracy_cpu.json)

For every experiment in CONFIG:
  1. train with its `train` config (pipeline/train.py), or take `model`;
  2. run pipeline/predict.py on the validation ROI and pick the threshold
     with the lowest VOI there (2D models: the mutex bias, one run each);
  3. run pipeline/predict.py on the test ROI and report the scores at that
     threshold, and separately the best threshold in hindsight.

Writes OUT_DIR/accuracy.md (the table), accuracy.json (every score) and
accuracy.png (VOI against threshold, test and validation), and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, model_validator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import AbsPath, RoiConfig, RunConfig, Strict, TrainConfig, ZarrPath, in_plane, load_json  # noqa: E402
from pipeline.run_layout import RunDir, RunLayout, run_record  # noqa: E402

COLUMNS = ("dataset", "method", "backbone", "post-processing", "threshold", "VOI split", "VOI merge", "VOI", "ARAND", "CREMI score")


class Experiment(Strict):
    name: str
    # a training config to run first, or an existing checkpoint
    train: AbsPath | None = None
    model: AbsPath | None = None
    raw: ZarrPath
    ground_truth: ZarrPath
    validation_roi: RoiConfig
    test_roi: RoiConfig
    # RunConfig sections (predict, fragments, agglomerate, postprocess) for both runs
    run: dict
    # 2D models: the mutex biases swept, one run each, in place of thresholds
    biases: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.3, 0.4, 0.5, 0.6, 0.7]

    @model_validator(mode="after")
    def _one_model(self) -> Experiment:
        if (self.train is None) == (self.model is None):
            raise ValueError("give exactly one of train or model")
        return self


class AccuracyConfig(Strict):
    out_dir: AbsPath
    experiments: list[Experiment]


def _python(*args: str) -> str:
    """Runs a pipeline command; its progress bars stay on stderr, its last
    stdout line (the command's summary) is returned."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return (result.stdout.strip().splitlines() or [""])[-1]


def _run(experiment: Experiment, model: Path, roi: RoiConfig, run_dir: Path, run: dict) -> list[dict]:
    """The main job on `roi`; its score rows."""
    config = RunConfig(
        run_dir=str(run_dir), raw=experiment.raw, ground_truth=experiment.ground_truth,
        roi=roi, model={"checkpoint": str(model)}, **run,
    )
    # the benchmark's run dirs are its own scratch: a run made with another
    # model (retrained, resumed) or other settings is started again, where
    # predict.py itself would refuse it
    if RunDir(run_dir).changed_key(run_record(RunLayout.from_config(config), config)) is not None:
        shutil.rmtree(run_dir)
    path = run_dir.parent / f"{run_dir.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=2))
    _python("pipeline/predict.py", str(path))
    return json.loads(RunDir(run_dir).report.read_text())["scores"]


def _scores(experiment: Experiment, model: Path, split: str, roi: RoiConfig, out: Path, planar: bool) -> list[dict]:
    """One run of the threshold sweep; for a 2D model one run per mutex
    bias, because the bias is fixed for a run (its blocks depend on it)."""
    if not planar:
        return _run(experiment, model, roi, out / split, experiment.run)
    rows = []
    for bias in experiment.biases:
        run = {**experiment.run, "mutex": {**experiment.run.get("mutex", {}), "bias": bias}}
        rows += _run(experiment, model, roi, out / split / f"bias_{bias:.2f}", run)
    return rows


def run_experiment(experiment: Experiment, out_dir: Path) -> dict:
    out = out_dir / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"name": experiment.name}
    if experiment.train is not None:
        train = TrainConfig(**load_json(experiment.train))
        # a re-run resumes from the latest checkpoint: the summary says which iterations ran
        result["train"] = {"config": experiment.train, "summary": _python("pipeline/train.py", experiment.train)}
        model = Path(train.experiment_dir) / "model.pt"
    else:
        model = Path(experiment.model)
    checkpoint = torch.load(model, map_location="cpu", weights_only=True)
    result["backbone"] = checkpoint["network"]["name"] + (" 2D" if checkpoint["network"].get("dims") == 2 else "")
    run = RunConfig(run_dir=str(out), raw=experiment.raw, model={"checkpoint": str(model)}, **experiment.run)
    planar = in_plane(checkpoint["offsets"])
    if planar:
        result["post_processing"] = "mutex watershed (threshold = bias), small-segment merging"
    else:
        result["post_processing"] = (
            f"{run.fragments.method} fragments, epsilon {run.fragments.epsilon_agglomerate}, waterz {run.agglomerate.scoring}"
        )
    result["validation"] = _scores(experiment, model, "validation", experiment.validation_roi, out, planar)
    result["test"] = _scores(experiment, model, "test", experiment.test_roi, out, planar)
    chosen = min(result["validation"], key=lambda r: r["voi"])["threshold"]
    result["chosen"] = next(r for r in result["test"] if r["threshold"] == chosen)
    result["hindsight"] = min(result["test"], key=lambda r: r["voi"])
    return result


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        for label, row in (("chosen on validation", r["chosen"]), ("best in hindsight", r["hindsight"])):
            cells = [r["name"], "affinity", r["backbone"], r["post_processing"], f"{row['threshold']:.2f} ({label})"]
            cells += [f"{row[k]:.3f}" for k in ("voi_split", "voi_merge", "voi", "arand", "cremi_score")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        for split, style in (("test", "-o"), ("validation", "--")):
            rows = r[split]
            axes.plot([x["threshold"] for x in rows], [x["voi"] for x in rows], style, label=f"{r['name']} {split}")
    axes.set_xlabel("agglomeration threshold (2D: mutex bias)")
    axes.set_ylabel("VOI (bits)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/accuracy.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="benchmark config JSON (see configs/accuracy_cpu.json)")
    args = parser.parse_args()
    config = AccuracyConfig(**load_json(args.config))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = [run_experiment(e, out_dir) for e in config.experiments]
    (out_dir / "accuracy.json").write_text(json.dumps(results, indent=2))
    (out_dir / "accuracy.md").write_text(table(results) + "\n")
    plot(results, out_dir / "accuracy.png")
    print(table(results))
    for r in results:
        if "train" in r:
            print(f"{r['name']}: {r['train']['summary']}")
    print(f"total {time.time() - started:.0f} s; wrote {out_dir}/accuracy.md, accuracy.json, accuracy.png")


if __name__ == "__main__":
    cli_main(main)
