"""Learning from a few annotated nuclei: how much of the dense-label
accuracy each method recovers (CRAC, issue 19).

    python benchmarks/sparse_nuclei.py [CONFIG] [--only TEXT ...] [--redo TEXT ...]
                                       [--results FILE]
    (CONFIG: configs/sparse_nuclei.json)

For each annotated fraction F, a sparse copy of the U2OS nuclei labels
(`pipeline/ingest.py --keep-instances F --ids-per-section --annotation-mask`,
seed 0: F of the (page, id) nuclei kept whole, the background known, the
other nuclei unknown). For each column (the masked-loss affinity model, PEA
on the sparse labels, CRAC) and training seed, the column's training config
trains on pages 0..39 of that copy (same backbone, crop and iterations in
every cell), the mutex bias (and, for a model with several
representations, the representation) is chosen by AJI on the validation
pages 40..49 and the test pages 50..59 are scored, both against the dense labels
(benchmarks/accuracy.py's runs). The 100% row scores the bundled dense
models the same way. Ablations: CRAC variants at one fraction.

Every cell resumes: a cell whose scores are in the results file is not
redone (`--redo TEXT` redoes the cells whose name holds the text), a
finished training is reused, an interrupted one goes on from its
checkpoint; `--only` limits the work to the cells whose name holds one of
the texts (e.g. "10%"). The results file (OUT_DIR/sparse_nuclei.json, or
`--results FILE`) records each cell's scores, training wall time, machine
and date, so a table measured over several sessions says where each figure
came from; the tables go beside it as .md and are printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.accuracy import Experiment, run_experiment  # noqa: E402
from benchmarks.cells import measured, summary, table_main, train  # noqa: E402
from pipeline.cli import cli_main  # noqa: E402
from pipeline.config import AbsPath, RoiConfig, Strict, ZarrPath, load_json  # noqa: E402

SCORES = ("aji", "pq", "sbd")


class Column(Strict):
    train: AbsPath  # the training config; its volumes and seed are the cell's
    dense_model: AbsPath | None = None  # the bundled model of the 100% row
    biases: list[Annotated[float, Field(gt=0, lt=1)]]
    # a model with several representations (CRAC): those scored beside its
    # default one; validation chooses the representation with the bias
    other_representations: list[str] = []


class SparseNucleiConfig(Strict):
    out_dir: AbsPath
    dense_labels: str  # the source ingest reads (a TIFF stack)
    raw: ZarrPath
    ground_truth: ZarrPath
    sparse_container: AbsPath  # where the sparse copies go: labels_P, mask_P
    train_roi: RoiConfig
    validation_roi: RoiConfig
    test_roi: RoiConfig
    fractions: list[Annotated[float, Field(gt=0, lt=1)]]
    # training seeds per fraction ("0.1": [0, 1]); other fractions: [0]
    seeds: dict[str, list[int]] = {}
    # per fraction, the training's min_annotated where the training configs'
    # is one no location reaches ("0.05": 0.02; train.py refuses it)
    min_annotated: dict[str, Annotated[float, Field(gt=0, lt=1)]] = {}
    columns: dict[str, Column]
    # CRAC method settings changed for each ablation row, at one fraction
    ablation_column: str
    ablation_fraction: float
    ablations: dict[str, dict]
    # RunConfig sections for every run (predict, mutex, postprocess)
    run: dict

    @model_validator(mode="after")
    def _keys_are_fractions(self) -> SparseNucleiConfig:
        known = {f"{fraction:g}" for fraction in self.fractions}
        for field in ("seeds", "min_annotated"):
            unknown = sorted(set(getattr(self, field)) - known)
            if unknown:
                raise ValueError(f"{field}: {unknown} are not among the fractions {sorted(known)}")
        return self


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def sparse_copy(config: SparseNucleiConfig, fraction: float) -> dict:
    """The training volume of a fraction, made once."""
    name = f"{fraction * 100:g}"
    labels, mask = Path(config.sparse_container) / f"labels_{name}", Path(config.sparse_container) / f"mask_{name}"
    if not (mask / ".zarray").exists():
        subprocess.run([sys.executable, "pipeline/ingest.py", config.dense_labels, "--labels", "--keep-instances", str(fraction),
                        "--ids-per-section", "--seed", "0", "--out", str(labels), "--annotation-mask", str(mask),
                        "--voxel-size", "1", "1", "1", "--chunk-shape", "1", "520", "696", "--overwrite"],
                       cwd=REPO, check=True)
    return {"raw": config.raw, "labels": str(labels), "labels_mask": str(mask), "roi": config.train_roi.model_dump()}


def score(config: SparseNucleiConfig, name: str, model: Path, column: Column) -> dict:
    """Test scores at the (representation, mutex bias) of the best validation
    AJI; the default representation's runs go under the cell's name."""
    best = None
    for representation in [None, *column.other_representations]:
        experiment = Experiment(name=name if representation is None else f"{name} ({representation})", model=str(model),
                                raw=config.raw, ground_truth=config.ground_truth, validation_roi=config.validation_roi,
                                test_roi=config.test_roi, run=config.run, biases=column.biases, select="aji",
                                representation=representation)
        result = run_experiment(experiment, Path(config.out_dir))
        validation = max(row["aji"] for row in result["validation"])
        if best is None or validation > best[0]:
            best = (validation, representation, result["chosen"])
    _, representation, chosen = best
    return {"bias": chosen["threshold"], "representation": representation or "default",
            **{k: chosen[k] for k in SCORES}}


def cells(config: SparseNucleiConfig):
    """(name, fraction or None for dense, column name, seed, method changes) in the order run."""
    for fraction in sorted(config.fractions, key=lambda f: f != config.ablation_fraction):
        for seed in config.seeds.get(f"{fraction:g}", [0]):
            for column in config.columns:
                yield f"{percent(fraction)} {column} seed {seed}", fraction, column, seed, None
    for column, settings in config.columns.items():
        if settings.dense_model is not None:
            yield f"100% {column}", None, column, None, None
    for label, changes in config.ablations.items():
        yield (f"{percent(config.ablation_fraction)} {config.ablation_column} {label}", config.ablation_fraction,
               config.ablation_column, 0, changes)


def run_cell(config: SparseNucleiConfig, name: str, fraction, column_name: str, seed, changes) -> dict:
    column = config.columns[column_name]
    cell = Path(config.out_dir) / re.sub(r"[^\w.-]+", "_", name)
    if fraction is None:
        return {"name": name, **score(config, name, Path(column.dense_model), column), "train_s": None, **measured()}
    overrides = {"volumes": [sparse_copy(config, fraction)], "seed": seed}
    if f"{fraction:g}" in config.min_annotated:
        overrides["min_annotated"] = config.min_annotated[f"{fraction:g}"]
    if changes:
        method = load_json(str(column.train))["method"]
        overrides["method"] = {**method, **changes}
    model, wall, cpu = train(cell, Path(column.train), overrides)
    return {"name": name, **score(config, name, model, column), "train_s": wall, "train_cpu_s": cpu, **measured()}


def tables(config: SparseNucleiConfig, results: dict[str, dict]) -> str:
    columns = list(config.columns)
    lines = ["| annotated nuclei | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for fraction in sorted(config.fractions):
        cells = []
        for column in columns:
            rows = [results[n] for n in results if n.startswith(f"{percent(fraction)} {column} seed ")]
            cells.append(summary(rows, SCORES))
        changed = config.min_annotated.get(f"{fraction:g}")
        label = percent(fraction) + ("" if changed is None else f" (min_annotated {changed:g})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    dense = [summary([results[f"100% {c}"]], SCORES) if f"100% {c}" in results else "—" for c in columns]
    lines.append("| 100% (dense, bundled) | " + " | ".join(dense) + " |")
    head = f"{percent(config.ablation_fraction)} {config.ablation_column}"
    ablation = [f"| {config.ablation_column} at {percent(config.ablation_fraction)} | AJI | PQ | SBD | mutex bias | training s |",
                "| --- | --- | --- | --- | --- | --- |"]
    for label, name in [("as configured (seed 0)", f"{head} seed 0")] + [(k, f"{head} {k}") for k in config.ablations]:
        if name in results:
            r = results[name]
            train_s = "—" if r["train_s"] is None else f"{r['train_s']:.0f}"
            ablation.append(f"| {label} | {r['aji']:.3f} | {r['pq']:.3f} | {r['sbd']:.3f} | {r['bias']:g} | {train_s} |")
    walls = ["| cell | chosen on validation | AJI | PQ | SBD | training s | training CPU s | machine, date |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        train_s = "—" if r["train_s"] is None else f"{r['train_s']:.0f}"
        train_cpu_s = "—" if r.get("train_cpu_s") is None else f"{r['train_cpu_s']:.0f}"
        where = f"{r['machine']}, {r['date']}" if "machine" in r else "not recorded"
        representation = r.get("representation", "default")
        chosen = f"bias {r['bias']:g}" + ("" if representation == "default" else f", {representation}")
        walls.append(f"| {name} | {chosen} | {r['aji']:.3f} | {r['pq']:.3f} | {r['sbd']:.3f} | {train_s} | {train_cpu_s} | {where} |")
    return "\n\n".join(["\n".join(lines), "\n".join(ablation), "\n".join(walls)])


def main() -> None:
    table_main("python benchmarks/sparse_nuclei.py", __doc__, "configs/sparse_nuclei.json", SparseNucleiConfig, "sparse_nuclei.json",
               lambda config: ((name, partial(run_cell, config, name, fraction, column, seed, changes))
                              for name, fraction, column, seed, changes in cells(config)),
               tables, SCORES)


if __name__ == "__main__":
    cli_main(main)
