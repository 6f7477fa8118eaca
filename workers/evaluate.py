"""Block-wise evaluation: for each block, the contingency table of the
segmentation at every threshold (fragments through each look-up table)
against the ground truth, and for a 2D run each section's instance scores.
A block's tables go to RUN_DIR/evaluation/BLOCK.npz, which the master adds
up (pipeline/evaluate.py); no worker or master ever holds a whole volume.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from funlib.persistence import open_ds

from pipeline.evaluation.instance_metrics import SCORES as INSTANCE_SCORES
from pipeline.evaluation.instance_metrics import instance_scores
from pipeline.evaluation.metrics import contingency_pairs
from pipeline.kernels.lut import LookUpTable, map_each
from pipeline.storage.files import write_atomically
from pipeline.storage.volumes import open_volume, read_roi, split_path
from workers.loop import ProcessBlock, WorkerRun, run_worker


def block_result(segmentations: list[np.ndarray], truth: np.ndarray, per_section: bool) -> dict[str, np.ndarray]:
    """Row k's contingency table (`seg_k`, `gt_k`, `counts_k`) for the k-th
    segmentation of one block, and with `per_section` the instance scores of
    each section (`sections`, one row per section in INSTANCE_SCORES order)."""
    result = {}
    for k, segmentation in enumerate(segmentations):
        result[f"seg_{k}"], result[f"gt_{k}"], result[f"counts_{k}"] = contingency_pairs(segmentation, truth)
    if per_section:
        rows = [instance_scores(t, s) for t, s in zip(truth, segmentations[0])]
        result["sections"] = np.array([[row[k] for k in INSTANCE_SCORES] for row in rows], dtype=np.float64)
    return result


@contextmanager
def setup(run: WorkerRun) -> Iterator[ProcessBlock]:
    layout, run_dir = run.layout, run.run_dir
    # the master's choice for this evaluation (pipeline/evaluate.py), not
    # the run's config, whose ground truth and thresholds it may override
    target = json.loads(run_dir.evaluation_target.read_text())
    gt = open_volume(*split_path(target["ground_truth"]), field="ground_truth")
    name = target["labels"]
    labels = open_ds(run_dir.volumes / name)
    # one row per table; None: the row scores the labels themselves
    tables = [None if key is None else LookUpTable.open(run_dir.lut(key)) for key in target["tables"]]
    mapped = [table for table in tables if table is not None]

    def process_block(block) -> None:
        roi = block.write_roi
        data = read_roi(labels, roi, name)
        through = iter(map_each(mapped, data))
        segmentations = [data if table is None else next(through) for table in tables]
        truth = read_roi(gt, roi, target["ground_truth"])
        result = block_result(segmentations, truth, per_section=target["per_section"])
        buffer = io.BytesIO()
        np.savez(buffer, **result)
        write_atomically(run_dir.evaluation / f"{layout.block_index(roi)}.npz", buffer.getvalue())

    yield process_block


def main() -> None:
    run_worker(setup, "evaluate")


if __name__ == "__main__":
    main()
