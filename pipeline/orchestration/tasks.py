"""daisy tasks for the block-wise steps of a run.

Each task's process function is a launcher (a worker command); its block
geometry comes from the run layout; its done markers live under
RUN_DIR/tracking, which is what lets a re-run skip finished blocks.
"""

from __future__ import annotations

import json
import shutil

import daisy
from funlib.geometry import Coordinate, Roi

from pipeline.config import RunConfig, threshold_key
from pipeline.orchestration.launchers import make_launcher
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.storage.files import write_atomically

MAX_RETRIES = 2


def _task(step: str, tracking: str, config: RunConfig, run_dir: RunDir, total: Roi, read: Roi, write: Roi, fit: str, workers: int) -> daisy.Task:
    return daisy.Task(
        step,
        total_roi=total,
        read_roi=read,
        write_roi=write,
        process_function=make_launcher(step, str(run_dir.config), config.launcher),
        read_write_conflict=False,
        fit=fit,
        max_workers=workers,
        max_retries=MAX_RETRIES,
        timeout=config.block_timeout_s,
        tracking_path=str(run_dir.tracking(tracking)),
        resource_tracking=True,
    )


def blockwise_geometry(layout: RunLayout, block: Coordinate, context: Coordinate) -> tuple[Roi, Roi, Roi]:
    total = layout.roi.grow(context, context)
    read = Roi((0, 0, 0), block + context * 2)
    write = Roi(context, block)
    return total, read, write


def _after_predict(config: RunConfig, layout: RunLayout, run_dir: RunDir, *tasks: daisy.Task) -> daisy.Pipeline:
    """`tasks` chained block by block, after the predict step when the run
    has one (given affinities have none)."""
    if layout.predicted:
        # predict blocks overhang the far edges: the network needs its full
        # (valid) shape, and the worker keeps the part inside the volume
        predict = _task(
            "predict", "predict", config, run_dir,
            *blockwise_geometry(layout, layout.predict_output, layout.predict_read_context),
            fit="overhang", workers=config.predict.workers,
        )
        tasks = (predict, *tasks)
    pipeline = tasks[0]
    for task in tasks[1:]:
        pipeline = pipeline + task
    return pipeline


def graph_pipeline(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Pipeline:
    """predict -> fragments -> agglomerate, pipelined block by block."""
    postprocess = blockwise_geometry(layout, layout.block_shape, layout.context)
    fragments = _task("fragments", "fragments", config, run_dir, *postprocess, fit="shrink", workers=config.postprocess.workers)
    agglomerate = _task("agglomerate", "agglomerate", config, run_dir, *postprocess, fit="shrink", workers=config.postprocess.workers)
    return _after_predict(config, layout, run_dir, fragments, agglomerate)


def mutex_pipeline(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Pipeline:
    """2D: predict -> mutex watershed per section, straight into the
    segmentation. A section depends only on its own affinities: no context."""
    geometry = blockwise_geometry(layout, layout.block_shape, Coordinate(0, 0, 0))
    mutex = _task("mutex", "mutex", config, run_dir, *geometry, fit="shrink", workers=config.postprocess.workers)
    return _after_predict(config, layout, run_dir, mutex)


def relabel_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """Relabel the fragments with the chosen threshold's look-up table. The
    done markers belong to the table the segmentation volume holds: when the
    chosen one differs (0.5, then 0.3, then 0.5 again), they are cleared
    before the target is recorded, so every block is redone and a crash
    between the two steps still leaves no marker of the old table."""
    target = {"scoring": config.agglomerate.scoring, "threshold": threshold_key(config.agglomerate.threshold)}
    recorded = json.loads(run_dir.relabel_target.read_text()) if run_dir.relabel_target.exists() else None
    if recorded != target:
        shutil.rmtree(run_dir.tracking("relabel"), ignore_errors=True)
        write_atomically(run_dir.relabel_target, json.dumps(target))
    geometry = blockwise_geometry(layout, layout.block_shape, Coordinate(0, 0, 0))
    return _task("relabel", "relabel", config, run_dir, *geometry, fit="shrink", workers=config.postprocess.workers)


def evaluate_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """Contingency tables block by block (workers/evaluate.py). Evaluation
    is redone whole each time (its inputs, thresholds and ground truth may
    have changed), so its done markers are cleared first."""
    shutil.rmtree(run_dir.tracking("evaluate"), ignore_errors=True)
    geometry = blockwise_geometry(layout, layout.block_shape, Coordinate(0, 0, 0))
    return _task("evaluate", "evaluate", config, run_dir, *geometry, fit="shrink", workers=config.postprocess.workers)
