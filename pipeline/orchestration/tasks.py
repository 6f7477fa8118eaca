"""daisy tasks for the block-wise steps of a run.

Each task's process function is a launcher (a worker command); its block
geometry comes from the run layout; its done markers live under
RUN_DIR/tracking, which is what lets a re-run skip finished blocks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection

import daisy
from funlib.geometry import Coordinate, Roi

from pipeline.config import RunConfig, threshold_key
from pipeline.orchestration.launchers import make_launcher
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.storage.files import write_atomically

MAX_RETRIES = 2


def step_geometry(layout: RunLayout, step: str) -> tuple[Roi, Roi, Roi, str]:
    """(total, read, write ROI, fit) of a block-wise step's daisy task: the
    one place that says how a step tiles the volume (the resume check in
    pipeline/orchestration/resume.py reads the same)."""
    if step == "predict":
        # predict blocks overhang the far edges: the network needs its full
        # (valid) shape, and the worker keeps the part inside the volume
        return (*blockwise_geometry(layout, layout.predict_output, layout.predict_read_context), "overhang")
    # mutex: a section depends only on its own affinities; relabel and
    # evaluate map each voxel on its own: no context
    context = layout.context if step in ("fragments", "agglomerate") else Coordinate(0, 0, 0)
    return (*blockwise_geometry(layout, layout.block_shape, context), "shrink")


def blockwise_geometry(layout: RunLayout, block: Coordinate, context: Coordinate) -> tuple[Roi, Roi, Roi]:
    total = layout.roi.grow(context, context)
    read = Roi((0, 0, 0), block + context * 2)
    write = Roi(context, block)
    return total, read, write


def _task(step: str, config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    total, read, write, fit = step_geometry(layout, step)
    return daisy.Task(
        step,
        total_roi=total,
        read_roi=read,
        write_roi=write,
        process_function=make_launcher(step, str(run_dir.config), config.launcher),
        read_write_conflict=False,
        fit=fit,
        max_workers=config.predict.workers if step == "predict" else config.postprocess.workers,
        max_retries=MAX_RETRIES,
        timeout=config.block_timeout_s,
        tracking_path=str(run_dir.tracking(step)),
        resource_tracking=True,
    )


def _after_predict(config: RunConfig, layout: RunLayout, run_dir: RunDir, done: Collection[str], *steps: str) -> daisy.Pipeline | None:
    """The tasks of `steps` chained block by block, after the predict step
    when the run has one (given affinities have none), less the steps in
    `done` (every block finished: daisy would spend seconds skipping them);
    None when none is left."""
    steps = ("predict", *steps) if layout.predicted else steps
    tasks = [_task(step, config, layout, run_dir) for step in steps if step not in done]
    if not tasks:
        return None
    pipeline = tasks[0]
    for task in tasks[1:]:
        pipeline = pipeline + task
    return pipeline


def graph_pipeline(config: RunConfig, layout: RunLayout, run_dir: RunDir, done: Collection[str] = ()) -> daisy.Pipeline | None:
    """predict -> fragments -> agglomerate, pipelined block by block."""
    return _after_predict(config, layout, run_dir, done, "fragments", "agglomerate")


def mutex_pipeline(config: RunConfig, layout: RunLayout, run_dir: RunDir, done: Collection[str] = ()) -> daisy.Pipeline | None:
    """2D: predict -> mutex watershed per section, straight into the
    segmentation."""
    return _after_predict(config, layout, run_dir, done, "mutex")


def choose_relabel_target(config: RunConfig, run_dir: RunDir) -> None:
    """The done markers of relabel belong to the look-up table the
    segmentation volume holds: when the chosen one differs (0.5, then 0.3,
    then 0.5 again), they are cleared before the target is recorded, so
    every block is redone and a crash between the two steps still leaves no
    marker of the old table. Called before relabel's markers are read."""
    target = {"scoring": config.agglomerate.scoring, "threshold": threshold_key(config.agglomerate.threshold)}
    recorded = json.loads(run_dir.relabel_target.read_text()) if run_dir.relabel_target.exists() else None
    if recorded != target:
        shutil.rmtree(run_dir.tracking("relabel"), ignore_errors=True)
        write_atomically(run_dir.relabel_target, json.dumps(target))


def relabel_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """Relabel the fragments with the chosen threshold's look-up table
    (after `choose_relabel_target`)."""
    return _task("relabel", config, layout, run_dir)


def evaluate_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """Contingency tables block by block (workers/evaluate.py). Evaluation
    is redone whole each time (its inputs, thresholds and ground truth may
    have changed), so its done markers are cleared first."""
    shutil.rmtree(run_dir.tracking("evaluate"), ignore_errors=True)
    return _task("evaluate", config, layout, run_dir)
