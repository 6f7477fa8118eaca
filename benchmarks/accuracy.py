"""Accuracy benchmark: train (or load) a model, run the main job on held-out
parts of the bundled data, and tabulate the scores.

    python benchmarks/accuracy.py CONFIG        (make accuracy: configs/accuracy_cpu.json)

For every experiment in CONFIG:
  1. train with its `train` config (pipeline/train.py; `train_overrides`
     change keys of it, e.g. the method's terms for an ablation), or take
     `model`;
  2. run pipeline/predict.py on the validation ROI and pick the threshold
     with the lowest VOI there (2D models: the mutex bias, one run each,
     the first predicting and the others partitioning its predictions;
     `select: "aji"` picks the highest AJI, for images with background);
  3. run pipeline/predict.py on the test ROI and report the scores at that
     threshold, and separately the best threshold in hindsight.
A `classical` experiment has no network: Otsu's threshold and a seeded
distance-transform watershed per image, its seed distance chosen the same way.

Writes OUT_DIR/accuracy.md (a VOI table for EM volumes, an instance-score
table for images with background), accuracy.json (every score) and
accuracy.png (VOI against threshold, test and validation), and prints the
tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funlib.geometry import Roi  # noqa: E402

from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import AbsPath, GivenOutput, RoiConfig, RunConfig, Strict, ZarrPath, default_partition, load_json  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.evaluation.instance_metrics import SCORES as INSTANCE_SCORES  # noqa: E402
from pipeline.evaluation.instance_metrics import mean_instance_scores  # noqa: E402
from pipeline.kernels.classical import otsu_watershed  # noqa: E402
from pipeline.methods import load_model  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.orchestration.run_layout import RunDir, RunLayout, run_record  # noqa: E402
from pipeline.storage.volumes import open_volume, split_path  # noqa: E402

COLUMNS = ("dataset", "method", "backbone", "post-processing", "threshold", "VOI split", "VOI merge", "VOI", "ARAND", "CREMI score")
# the pipes of |DiC| escaped, or they would split the markdown column
INSTANCE_COLUMNS = ("dataset", "method", "backbone", "post-processing", "chosen", "AJI", "Dice", "PQ", "SBD", "\\|DiC\\|")


class Classical(Strict):
    """The no-network row: seed distances tried on the validation images."""

    min_distances: list[Annotated[int, Field(gt=0)]] = [5, 7, 9, 12]


class Experiment(Strict):
    name: str
    # a training config to run first, or an existing checkpoint, or no network
    train: AbsPath | None = None
    # top-level keys of the training config replaced for this experiment; its
    # experiment_dir becomes OUT_DIR/NAME/train
    train_overrides: dict = {}
    model: AbsPath | None = None
    classical: Classical | None = None
    raw: ZarrPath
    ground_truth: ZarrPath
    validation_roi: RoiConfig
    test_roi: RoiConfig
    # RunConfig sections (predict, fragments, agglomerate, postprocess) for both runs
    run: dict = {}
    # the offsets the runs predict (model.offsets); default: the training offsets
    offsets: list[tuple[int, int, int]] | None = None
    # model.representation of the runs (CRAC: "embedding" or "explicit");
    # default: the model's own
    representation: str | None = None
    # mutex watershed (mutex_2d, mutex_3d): the biases swept, one run each,
    # in place of thresholds
    biases: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.3, 0.4, 0.5, 0.6, 0.7]
    # what picks the threshold on validation: the lowest VOI, or the highest
    # AJI (images with background, scored by instance scores)
    select: Literal["voi", "aji"] = "voi"

    @model_validator(mode="after")
    def _one_model(self) -> Experiment:
        if sum(x is not None for x in (self.train, self.model, self.classical)) != 1:
            raise ValueError("give exactly one of train, model or classical")
        return self


class AccuracyConfig(Strict):
    out_dir: AbsPath
    experiments: list[Experiment]


def _python(*args: str) -> str:
    """Runs a pipeline command; its progress bars stay on stderr, its last
    stdout line (the command's summary) is returned."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return (result.stdout.strip().splitlines() or [""])[-1]


def _run(experiment: Experiment, model: Path, roi: RoiConfig, run_dir: Path, run: dict,
         given: dict | None = None) -> list[dict]:
    """The main job on `roi` (from the predictions of an earlier run, if
    `given`: its AffinitiesConfig); its score rows."""
    source = {"affinities": given} if given is not None else {
        "model": {"checkpoint": str(model), "offsets": experiment.offsets, "representation": experiment.representation}}
    config = RunConfig(run_dir=str(run_dir), raw=experiment.raw, ground_truth=experiment.ground_truth, roi=roi,
                       **source, **run)
    # the benchmark's run dirs are its own scratch: a run made with another
    # model (retrained, resumed) or other settings is started again, where
    # predict.py itself would refuse it
    try:
        changed = RunDir(run_dir).changed_key(run_record(RunLayout.from_config(config), config)) is not None
    except UserError:  # a damaged record, or one from an older affseg
        changed = True
    if changed:
        shutil.rmtree(run_dir)
    path = run_dir.parent / f"{run_dir.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=2))
    _python("pipeline/predict.py", str(path))
    return json.loads(RunDir(run_dir).report.read_text())["scores"]


def _scores(experiment: Experiment, model: Path, split: str, roi: RoiConfig, out: Path, partition: str) -> list[dict]:
    """One run of the threshold sweep (waterz); for the mutex watershed one
    run per bias, because the bias is fixed for a run (its blocks depend on
    it): the first predicts, the others partition its predictions (given
    affinities and outputs), which gives the scores predicting would."""
    if partition == "waterz":
        return _run(experiment, model, roi, out / split, experiment.run)
    rows, given = [], None
    for bias in experiment.biases:
        run = {**experiment.run, "mutex": {**experiment.run.get("mutex", {}), "bias": bias}}
        if given is not None:
            run.pop("predict", None)
        run_dir = out / split / f"bias_{bias:.2f}"
        rows += _run(experiment, model, roi, run_dir, run, given)
        if given is None:
            given = predictions(RunDir(run_dir))
    return rows


def predictions(run_dir: RunDir) -> dict:
    """A finished run's predictions as given affinities (AffinitiesConfig)."""
    layout = run_dir.read_layout()
    return {"dataset": str(run_dir.volumes / "affs"), "offsets": [list(o) for o in layout.offsets],
            "outputs": {name: str(run_dir.volumes / name) for name, _, _ in layout.extras
                        if name in get_args(GivenOutput)}}


def _train(experiment: Experiment, out: Path) -> tuple[Path, dict]:
    """Trains (or resumes) the experiment's model; (model file, record)."""
    config = experiment.train
    if experiment.train_overrides:
        data = {**load_json(config), **experiment.train_overrides, "experiment_dir": str(out / "train")}
        config = str(out / "train.json")
        Path(config).write_text(json.dumps(data, indent=2))
    train = TrainConfig(**load_json(config))
    started = time.time()
    # a re-run resumes from the latest checkpoint: the summary says which iterations ran
    summary = _python("pipeline/train.py", config)
    return Path(train.experiment_dir) / "model.pt", {"config": config, "summary": summary, "wall_s": round(time.time() - started)}


def _pages(path: str, roi: RoiConfig):
    volume = open_volume(*split_path(path), field="volume")
    return volume[Roi(roi.offset, roi.shape)]


def classical_experiment(experiment: Experiment) -> dict:
    """Otsu + seeded watershed per page; the seed distance is the threshold."""
    result: dict = {"name": experiment.name, "method": "classical (no network)", "backbone": "-",
                    "post_processing": "Otsu threshold, distance-transform seeded watershed"}
    for split, roi in (("validation", experiment.validation_roi), ("test", experiment.test_roi)):
        images, truths = _pages(experiment.raw, roi), _pages(experiment.ground_truth, roi)
        result[split] = [
            {"threshold": d, **mean_instance_scores(truths, [otsu_watershed(image, d) for image in images])}
            for d in experiment.classical.min_distances
        ]
    return result


def run_experiment(experiment: Experiment, out_dir: Path) -> dict:
    out = out_dir / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    if experiment.classical is not None:
        result = classical_experiment(experiment)
    else:
        result = {"name": experiment.name}
        if experiment.train is not None:
            model, result["train"] = _train(experiment, out)
        else:
            model = Path(experiment.model)
        loaded = load_model(model)
        spec = loaded.backbone.spec
        result["backbone"] = type(loaded.backbone).__name__ + (" 2D" if getattr(spec, "dims", 3) == 2 else "")
        result["method"] = _describe(loaded.method)
        run = RunConfig(run_dir=str(out), raw=experiment.raw, model={"checkpoint": str(model), "offsets": experiment.offsets},
                        **experiment.run)
        partition = run.partition or default_partition(run.model.offsets or loaded.offsets)
        if partition == "mutex_2d":
            result["post_processing"] = "mutex watershed (threshold = bias), small-segment merging"
        elif partition == "mutex_3d":
            stride = run.mutex.long_range_stride
            result["post_processing"] = (f"mutex watershed per block (threshold = bias{', long-range stride ' + ' '.join(map(str, stride)) if stride else ''}), "
                                         f"graph mutex watershed, segments < {run.mutex.min_size} grown over")
        else:
            result["post_processing"] = (
                f"{run.fragments.method} fragments, epsilon {run.fragments.epsilon_agglomerate}, waterz {run.agglomerate.scoring}"
            )
        result["validation"] = _scores(experiment, model, "validation", experiment.validation_roi, out, partition)
        result["test"] = _scores(experiment, model, "test", experiment.test_roi, out, partition)
    if experiment.select == "aji":
        pick = lambda rows: max(rows, key=lambda r: r["aji"])  # noqa: E731
    else:
        pick = lambda rows: min(rows, key=lambda r: r["voi"])  # noqa: E731
    chosen = pick(result["validation"])["threshold"]
    result["select"] = experiment.select
    result["chosen"] = next(r for r in result["test"] if r["threshold"] == chosen)
    result["hindsight"] = pick(result["test"])
    return result


def _describe(method) -> str:
    """The method and its switched-on terms, as a table cell."""
    if method.name != "embedding":
        return method.name + (" + foreground" if method.foreground else "")
    terms = [t for t, on in (("SCM", method.scm), ("CCM", method.ccm), ("EPM", method.epm)) if on]
    return f"PEA {'+'.join(terms)}" + (" + foreground" if method.foreground else "")


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        if r["select"] != "voi":
            continue
        for label, row in (("chosen on validation", r["chosen"]), ("best in hindsight", r["hindsight"])):
            cells = [r["name"], r["method"], r["backbone"], r["post_processing"], f"{row['threshold']:.2f} ({label})"]
            cells += [f"{row[k]:.3f}" for k in ("voi_split", "voi_merge", "voi", "arand", "cremi_score")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def instance_table(results: list[dict]) -> str:
    """Images with background: the 2D instance scores at the threshold
    (mutex bias, or the classical seed distance) chosen on validation."""
    lines = ["| " + " | ".join(INSTANCE_COLUMNS) + " |", "|" + " --- |" * len(INSTANCE_COLUMNS)]
    for r in results:
        if r["select"] != "aji":
            continue
        row = r["chosen"]
        cells = [r["name"], r["method"], r["backbone"], r["post_processing"], f"{row['threshold']:g}"]
        cells += [f"{row[k]:.3f}" if k != "dic" else f"{row[k]:.1f}" for k in INSTANCE_SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["select"] != "voi":
            continue
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
    tables = [t for t in (table(results), instance_table(results)) if t.count("\n") > 1]
    (out_dir / "accuracy.md").write_text("\n\n".join(tables) + "\n")
    plot(results, out_dir / "accuracy.png")
    print("\n\n".join(tables))
    for r in results:
        if "train" in r:
            print(f"{r['name']}: {r['train']['summary']}")
    print(f"total {time.time() - started:.0f} s; wrote {out_dir}/accuracy.md, accuracy.json, accuracy.png")


if __name__ == "__main__":
    cli_main(main)
