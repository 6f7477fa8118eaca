"""Latent single-instance masks against affinity heads (issue 21's table),
and how well the MaskAggr uncertainty finds the errors.

    python benchmarks/latent_masks_table.py [CONFIG] [--only TEXT ...] [--redo TEXT ...]
                                           [--results FILE]
    (CONFIG: configs/latent_masks_table.json)

Each row is a model kind (affinity heads alone, latent masks with MaskAggr,
both), each column a dataset (the nuclei pages, fib25 sections); a cell
trains the row's config for that dataset (the same backbone and iterations
in every row of a column), chooses the mutex bias on the validation ROI
(AJI for the nuclei, VOI for fib25) and scores the test ROI
(benchmarks/accuracy.py's runs; a bias sweep predicts once). A cell may
name a bundled `model` instead (a reference row).

For a model with an uncertainty, the cell's chosen test run is scored with
pipeline/evaluation/uncertainty.py: the ROC AUC of the uncertainty for
wrong affinities (each voxel pair of the run's offsets, both voxels
labelled, thresholded at the run's mutex bias as its segmentation takes
them), for segments without a ground-truth match at
IoU > 0.5, and for contacts that split one object (the proofreading
list's rows).

Cells resume as in benchmarks/cells.py. The results file
(OUT_DIR/latent_masks_table.json, or `--results FILE`) records each cell's
scores, training and run wall times, machine and date; the tables go
beside it as .md and are printed.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.accuracy import Experiment, run_experiment  # noqa: E402
from benchmarks.cells import measured, summary, table_main, train  # noqa: E402
from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import AbsPath, RoiConfig, RunConfig, Strict, ZarrPath, load_json  # noqa: E402
from pipeline.evaluation.uncertainty import pair_errors, segment_errors  # noqa: E402
from pipeline.orchestration.run_layout import RunDir, prediction_path  # noqa: E402
from pipeline.storage.volumes import open_volume, split_path  # noqa: E402

SCORES = {"aji": ("aji", "pq"), "voi": ("voi", "arand")}


class Dataset(Strict):
    raw: ZarrPath
    ground_truth: ZarrPath
    validation_roi: RoiConfig
    test_roi: RoiConfig
    # what chooses the bias on validation: the highest AJI (images with
    # background) or the lowest VOI (EM volumes)
    select: Literal["aji", "voi"]
    # RunConfig sections for every run (predict, mutex, postprocess)
    run: dict


class Cell(Strict):
    # a training config (trained, or resumed, in OUT_DIR/CELL/train unless
    # it is the config's own experiment_dir), or a bundled model
    train: AbsPath | None = None
    # top-level keys of the training config replaced for this cell (a
    # row's method on a column's one config)
    changes: dict = {}
    model: AbsPath | None = None
    biases: list[Annotated[float, Field(gt=0, lt=1)]]
    representation: str | None = None  # model.representation of the runs
    # training seeds (the config's `seed`): the table gives their mean and
    # half range; seed 0's cell is named as the row, another's "ROW seed N"
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = [0]

    @model_validator(mode="after")
    def _one(self) -> Cell:
        if (self.train is None) == (self.model is None):
            raise ValueError("give exactly one of train or model")
        if self.model is not None and self.seeds != [0]:
            raise ValueError("seeds are for a cell that trains, not a bundled model")
        return self


class TableConfig(Strict):
    out_dir: AbsPath
    datasets: dict[str, Dataset]
    # row -> dataset -> cell; a row may leave a dataset out
    rows: dict[str, dict[str, Cell]]

    @model_validator(mode="after")
    def _known(self) -> TableConfig:
        for row, cells in self.rows.items():
            unknown = set(cells) - set(self.datasets)
            if unknown:
                raise ValueError(f"rows.{row}: no dataset {sorted(unknown)[0]!r}; the datasets are {sorted(self.datasets)}")
        return self


def uncertainty_scores(run_dir: RunDir, bias: float) -> dict | None:
    """The AUCs of a finished run with an uncertainty and ground truth
    (pairs: the affinities thresholded at the run's mutex `bias`, as its
    segmentation takes them); None for a run without an uncertainty."""
    layout = run_dir.read_layout()
    if not layout.uncertain:
        return None
    config = RunConfig(**load_json(str(run_dir.path.parent / f"{run_dir.path.name}.json")))

    def read(path, field: str):
        volume = open_volume(*split_path(path), field=field)
        return volume[layout.roi]

    affs, uncertainty = read(prediction_path(config, run_dir), "affs"), read(prediction_path(config, run_dir, "uncertainty"), "uncertainty")
    truth, segmentation = read(config.ground_truth, "ground_truth"), read(run_dir.volumes / "segmentation", "segmentation")
    tables = {}
    for name in ("segments", "edges"):
        with open(run_dir.proofreading / f"{name}.csv") as f:
            tables[name] = list(csv.DictReader(f))
    segments = [(int(r["segment"]), float(r["uncertainty"])) for r in tables["segments"]]
    edges = [(int(r["segment_a"]), int(r["segment_b"]), float(r["uncertainty"])) for r in tables["edges"]]
    return {"pairs": pair_errors(affs, uncertainty, truth, layout.offsets, bias),
            **segment_errors(segmentation, truth, segments, edges, per_section=layout.partitioner.sections_are_images)}


def run_cell(config: TableConfig, name: str, row: str, dataset_name: str, seed: int) -> dict:
    cell, dataset = config.rows[row][dataset_name], config.datasets[dataset_name]
    out = Path(config.out_dir)
    if cell.model is not None:
        model, wall, cpu = Path(cell.model), None, None
    else:
        changes = {**cell.changes, "seed": seed} if seed else cell.changes
        model, wall, cpu = train(out / re.sub(r"[^\w.-]+", "_", name), Path(cell.train), changes)
    experiment = Experiment(name=re.sub(r"[^\w.-]+", "_", name), model=str(model), raw=dataset.raw,
                            ground_truth=dataset.ground_truth, validation_roi=dataset.validation_roi,
                            test_roi=dataset.test_roi, run=dataset.run, biases=cell.biases, select=dataset.select,
                            representation=cell.representation)
    result = run_experiment(experiment, out)
    chosen = result["chosen"]
    test_dir = RunDir(out / experiment.name / "test" / f"bias_{chosen['threshold']:.2f}")
    # the sweep's first run predicted; the others read its predictions
    first = RunDir(out / experiment.name / "test" / f"bias_{cell.biases[0]:.2f}")
    return {"name": name, "bias": chosen["threshold"], **{k: chosen[k] for k in SCORES[dataset.select]},
            "uncertainty": uncertainty_scores(test_dir, chosen["threshold"]), "train_s": wall, "train_cpu_s": cpu,
            "test_run_s": json.loads(first.report.read_text())["wall_s"], **measured()}


def cells(config: TableConfig):
    """(name, row, dataset, seed) of every cell in the order run."""
    for dataset in config.datasets:
        for row, by_dataset in config.rows.items():
            if dataset in by_dataset:
                for seed in by_dataset[dataset].seeds:
                    yield seed_name(f"{dataset}: {row}", seed), row, dataset, seed


def seed_name(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name} seed {seed}"


def tables(config: TableConfig, results: dict[str, dict]) -> str:
    datasets = list(config.datasets)
    lines = ["| model | " + " | ".join(f"{d} ({', '.join(k.upper() for k in SCORES[config.datasets[d].select])})"
                                       for d in datasets) + " |",
             "| --- |" + " --- |" * len(datasets)]
    for row in config.rows:
        cells = []
        for dataset in datasets:
            if dataset not in config.rows[row]:
                cells.append("—")
                continue
            seeds = config.rows[row][dataset].seeds
            runs = [results[n] for n in (seed_name(f"{dataset}: {row}", s) for s in seeds) if n in results]
            missing = f" (seeds run: {len(runs)} of {len(seeds)})" if 0 < len(runs) < len(seeds) else ""
            cells.append(summary(runs, SCORES[config.datasets[dataset].select]) + missing)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    auc = ["| cell | pairs: AUC (wrong) | segments: AUC (wrong) | edges: AUC (wrong) |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        if r.get("uncertainty"):
            u = r["uncertainty"]
            auc.append(f"| {name} | " + " | ".join(f"{u[k]['auc']:.3f} ({u[k]['wrong']:.3f} of {u[k]['items']})"
                                                   for k in ("pairs", "segments", "edges")) + " |")
    walls = ["| cell | bias | training s | training CPU s | test run s (predicting) | machine, date |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        fmt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
        walls.append(f"| {name} | {r['bias']:g} | {fmt(r['train_s'])} | {fmt(r['train_cpu_s'])} | "
                     f"{fmt(r['test_run_s'])} | {r['machine']}, {r['date']} |")
    return "\n\n".join("\n".join(t) for t in (lines, auc, walls))


def main() -> None:
    table_main("python benchmarks/latent_masks_table.py", __doc__, "configs/latent_masks_table.json", TableConfig, "latent_masks_table.json",
               lambda config: ((name, partial(run_cell, config, name, row, dataset, seed))
                              for name, row, dataset, seed in cells(config)),
               tables, tuple(k for keys in SCORES.values() for k in keys))


if __name__ == "__main__":
    cli_main(main)
