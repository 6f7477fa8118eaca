"""daisy tasks for the block-wise steps of a run.

Each task's process function is a launcher (a worker command); its block
geometry comes from the run layout; its done markers live under
RUN_DIR/tracking, which is what lets a re-run skip finished blocks.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection

import daisy
from funlib.geometry import Coordinate, Roi

from pipeline.config import RunConfig
from pipeline.orchestration.launchers import make_launcher
from pipeline.orchestration.run_layout import RunDir, RunLayout

MAX_RETRIES = 2
# the steps whose blocks read the post-processing context around them
CONTEXT_STEPS = ("fragments", "agglomerate", "mutex_fragments", "mutex_relabel")


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
    context = layout.context if step in CONTEXT_STEPS else Coordinate(0, 0, 0)
    if step == "proofread":
        # a boundary pair's partner lies one voxel beyond the block
        context = layout.voxel_size
    if step == "mutex_graph":
        # the block sees every voxel pair of its fragments, whatever the
        # offset, so an edge's evidence is the same in every block that
        # counts it; the fragments step needs no such reach
        reach = (max(abs(o[axis]) for o in layout.offsets) * layout.voxel_size[axis] for axis in range(3))
        context = Coordinate(max(c, r) for c, r in zip(layout.context, reach))
    return (*blockwise_geometry(layout, layout.block_shape, context), "shrink")


def blockwise_geometry(layout: RunLayout, block: Coordinate, context: Coordinate) -> tuple[Roi, Roi, Roi]:
    total = layout.roi.grow(context, context)
    read = Roi((0, 0, 0), block + context * 2)
    write = Roi(context, block)
    return total, read, write


def step_task(step: str, config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
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


def chain(config: RunConfig, layout: RunLayout, run_dir: RunDir, done: Collection[str], *steps: str) -> daisy.Pipeline | None:
    """The tasks of `steps` chained block by block, after the predict step
    when the run has one (given affinities have none), less the steps in
    `done` (every block finished: daisy would spend seconds skipping them);
    None when none is left."""
    steps = ("predict", *steps) if layout.predicted else steps
    tasks = [step_task(step, config, layout, run_dir) for step in steps if step not in done]
    if not tasks:
        return None
    pipeline = tasks[0]
    for task in tasks[1:]:
        pipeline = pipeline + task
    return pipeline


def proofread_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """The proofreading list's sums block by block (workers/proofread.py),
    redone whole each time as evaluation is."""
    shutil.rmtree(run_dir.tracking("proofread"), ignore_errors=True)
    return step_task("proofread", config, layout, run_dir)


def evaluate_task(config: RunConfig, layout: RunLayout, run_dir: RunDir) -> daisy.Task:
    """Contingency tables block by block (workers/evaluate.py). Evaluation
    is redone whole each time (its inputs, thresholds and ground truth may
    have changed), so its done markers are cleared first."""
    shutil.rmtree(run_dir.tracking("evaluate"), ignore_errors=True)
    return step_task("evaluate", config, layout, run_dir)
