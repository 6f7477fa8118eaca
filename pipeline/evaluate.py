"""Score a finished run against ground truth, one row per threshold.

    python pipeline/evaluate.py CONFIG

`predict.py` calls the same code as its last step when the config names
`ground_truth`; this command re-scores a finished run (for instance after
adding thresholds and re-running `predict.py`, which only rebuilds the LUTs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from funlib.geometry import Roi
from funlib.persistence import open_ds

from pipeline.config import RunConfig, threshold_key
from pipeline.cli import cli_main, run_command
from pipeline.errors import UserError
from pipeline.kernels.lut import LookUpTable
from pipeline.evaluation.instance_metrics import SCORES as INSTANCE_SCORES
from pipeline.evaluation.instance_metrics import instance_scores
from pipeline.evaluation.metrics import Contingency, scores
from pipeline.orchestration.run_layout import RunDir
from pipeline.storage.volumes import open_volume, split_path

COLUMNS = ("threshold", "voi_split", "voi_merge", "voi", "arand", "cremi_score")


def _lut(run_dir: RunDir, scoring: str, threshold: float):
    path = run_dir.lut(scoring, threshold)
    if not path.exists():
        raise UserError(
            f"agglomerate.thresholds: the run has no look-up table for threshold {threshold_key(threshold)} "
            f"({scoring}); run pipeline/predict.py with this config first, it builds the tables"
        )
    return LookUpTable.open(path)


def evaluate_run(config: RunConfig) -> list[dict[str, float]]:
    """One row per agglomeration threshold; a 2D (mutex watershed) run has
    one segmentation, reported in the row of its bias, with the 2D instance
    scores of each section (an independent image; label 0 = background)
    averaged over the sections."""
    run_dir = RunDir(Path(config.run_dir))
    layout = run_dir.read_layout()
    gt = open_volume(*split_path(config.ground_truth), field="ground_truth")
    if layout.is_2d:
        labels = open_ds(run_dir.volumes / "segmentation")
        luts = {config.mutex.bias: None}
    else:
        labels = open_ds(run_dir.volumes / "fragments")
        luts = {t: _lut(run_dir, config.agglomerate.scoring, t) for t in sorted(config.agglomerate.thresholds)}
    tables = {t: Contingency() for t in luts}
    sections = []
    roi = layout.roi
    slab_depth = layout.block_shape[0]
    for z in range(roi.begin[0], roi.end[0], slab_depth):
        slab = Roi((z, *roi.begin[1:]), (min(slab_depth, roi.end[0] - z), *roi.shape[1:]))
        data, truth = labels[slab], gt[slab]
        for t, lut in luts.items():
            tables[t].add(data if lut is None else lut.map(data), truth)
        if layout.is_2d:
            sections += [instance_scores(t, d) for t, d in zip(truth, data)]
    rows = [{"threshold": t, **scores(tables[t])} for t in luts]
    if sections:
        rows[0].update({k: sum(s[k] for s in sections) / len(sections) for k in INSTANCE_SCORES})
    return rows


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


def main() -> None:
    config, args = run_command("evaluate", __doc__, "print the rows as JSON instead of a table")
    if config.ground_truth is None:
        raise UserError("ground_truth: the config names no ground truth to evaluate against")
    if not RunDir(Path(config.run_dir)).layout.exists():
        raise UserError(f"run_dir: {config.run_dir} holds no run; run pipeline/predict.py first")
    rows = evaluate_run(config)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


if __name__ == "__main__":
    cli_main(main)
