"""Score a finished run against ground truth, one row per threshold.

    python pipeline/evaluate.py CONFIG

`predict.py` runs the same step last when the config names `ground_truth`;
this command re-scores a finished run (for instance against another ground
truth, or after adding thresholds and re-running `predict.py`, which only
rebuilds the LUTs). Evaluation is block-wise: workers write each block's
contingency tables (workers/evaluate.py), the master adds them up.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from daisy import logging as daisy_logging

from pipeline.config import RunConfig, threshold_key
from pipeline.cli import cli_main, run_command
from pipeline.errors import EXIT_FAILED, RunFailed, UserError
from pipeline.evaluation.instance_metrics import SCORES as INSTANCE_SCORES
from pipeline.evaluation.metrics import Contingency, scores
from pipeline.orchestration.daisy_run import run_daisy
from pipeline.orchestration.master_lock import master_lock
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.run_layout import RunDir, RunLayout, check_ground_truth
from pipeline.orchestration.tasks import evaluate_task

# the master sums the blocks' tables in groups of this many, so that its
# memory holds one entry per distinct (segment, label) pair, not per block
COMPACT_EVERY = 64

COLUMNS = ("threshold", "voi_split", "voi_merge", "voi", "arand", "cremi_score")


def evaluate_run(config: RunConfig, layout: RunLayout, run_dir: RunDir, progress: ProgressLog, report: dict) -> list[dict[str, float]]:
    """One row per segmentation the partitioner offers (Partitioner.rows:
    a waterz run's thresholds), from the evaluate task's blocks. Where each
    section is an image of its own (2D), the row also holds the 2D instance
    scores (label 0 = background) averaged over the sections."""
    partitioner = layout.partitioner
    partitioner.check_tables(config, run_dir)
    # tables of an earlier evaluation may be of other thresholds or
    # another ground truth: evaluation is redone whole each time
    shutil.rmtree(run_dir.evaluation, ignore_errors=True)
    rows = partitioner.rows(config)
    # what the workers score against: this command's config, which may name
    # another ground truth or thresholds than the run's config.json
    run_dir.evaluation.mkdir()
    target = {"ground_truth": config.ground_truth, "labels": partitioner.labels,
              "tables": [row.table for row in rows], "per_section": partitioner.sections_are_images}
    run_dir.evaluation_target.write_text(json.dumps(target))
    run_daisy(evaluate_task(config, layout, run_dir), progress, report, run_dir.logs)
    tables = [Contingency() for _ in rows]
    sections = []
    for n, path in enumerate(sorted(run_dir.evaluation.glob("*.npz")), start=1):
        with np.load(path) as block:
            for k, table in enumerate(tables):
                table.add_table(block[f"seg_{k}"], block[f"gt_{k}"], block[f"counts_{k}"])
            if partitioner.sections_are_images:
                sections.append(block["sections"])
        if n % COMPACT_EVERY == 0:
            for table in tables:
                table.compact()
    scored = [{"threshold": row.threshold, **scores(table)} for row, table in zip(rows, tables)]
    if sections:
        per_section = np.concatenate(sections)
        scored[0].update({k: float(v) for k, v in zip(INSTANCE_SCORES, per_section.mean(axis=0))})
    return scored


def _threshold_text(threshold: float) -> str:
    # two decimals where they are exact, the full key where they are not
    return f"{threshold:.2f}" if float(f"{threshold:.2f}") == threshold else threshold_key(threshold)


def format_table(rows: list[dict[str, float]]) -> str:
    columns = COLUMNS + tuple(c for c in INSTANCE_SCORES if c in rows[0])
    header = "".join(f"{c:>13}" for c in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{_threshold_text(row['threshold']):>13}" + "".join(f"{row[c]:>13.4f}" for c in columns[1:]))
    best = min(rows, key=lambda r: r["voi"])
    lines.append(f"best VOI at threshold {_threshold_text(best['threshold'])}: VOI {best['voi']:.4f}, ARAND {best['arand']:.4f}")
    return "\n".join(lines)


def main() -> int:
    config, args = run_command("evaluate", __doc__, "print the rows as JSON instead of a table")
    if config.ground_truth is None:
        raise UserError("ground_truth: the config names no ground truth to evaluate against")
    run_dir = RunDir(Path(config.run_dir))
    if not run_dir.layout.exists():
        raise UserError(f"run_dir: {config.run_dir} holds no run; run pipeline/predict.py first")
    layout = run_dir.read_layout()
    # the checks predict.py makes, before any worker starts
    check_ground_truth(config.ground_truth, layout.voxel_size, layout.roi)
    with master_lock(run_dir.master_lock):
        daisy_logging.set_log_basedir(run_dir.logs)
        progress = ProgressLog(run_dir.progress, ["evaluate"], {"evaluate": layout.voxels_per_block}, bars=False)
        try:
            rows = evaluate_run(config, layout, run_dir, progress, {"steps": {}})
        except RunFailed as e:
            print(f"affseg: evaluation failed: {e}\nworker logs: {run_dir.logs}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    cli_main(main)
