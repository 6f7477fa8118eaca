"""The main job's master: check the config against the data, claim the run
directory, and run the steps block by block (daisy), then the look-up
tables, relabelling and evaluation. `pipeline/predict.py` is its command
line."""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from daisy import logging as daisy_logging

from pipeline.config import RunConfig
from pipeline.evaluate import evaluate_run
from pipeline.proofreading import proofread_run
from pipeline.orchestration.daisy_run import report_finished, run_daisy
from pipeline.orchestration.devices import choose_device
from pipeline.orchestration.master_lock import master_lock
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.resume import describe, finished_blocks, keep_done_blocks
from pipeline.orchestration.run_layout import RunDir, RunLayout, check_run_dir, claim_run_dir, run_record, run_store
from pipeline.storage.files import write_atomically
from pipeline.storage.graph_store import FIRST_CONTACT_S, RunOwner
from pipeline.storage.volumes import PREDICTION_COMPRESSOR, prepare_volume


def _prepare_volumes(layout: RunLayout, run_dir: RunDir) -> None:
    vs = layout.voxel_size
    if layout.predicted:
        prepare_volume(run_dir.volumes, "affs", layout.roi, vs, "uint8", layout.predict_output, channels=len(layout.offsets),
                       compressor=PREDICTION_COMPRESSOR)
        for name, channels, dtype in layout.extras:
            prepare_volume(run_dir.volumes, name, layout.roi, vs, dtype, layout.predict_output, channels=channels,
                           compressor=PREDICTION_COMPRESSOR)
    for name in layout.partitioner.volumes:
        prepare_volume(run_dir.volumes, name, layout.roi, vs, "uint64", layout.block_shape)


def open_run(config: RunConfig, held: ExitStack | None = None) -> tuple[RunLayout, RunDir]:
    """Check the config against the data, claim (or re-open) the run
    directory, and prepare its volumes: everything before the first block.
    A master passes `held`, which keeps the run directory's master lock
    until the master is done."""
    layout = RunLayout.from_config(config)
    if layout.predicted and config.launcher.kind == "local":
        # local workers see this machine's GPUs: refuse "cuda" here, before
        # workers retry their blocks on a device that is not there (a
        # cluster's master may run where its workers' GPUs are not)
        choose_device(config.predict.device, field="predict.device")
    run_dir = RunDir(Path(config.run_dir))
    run_dir.check_writable()
    if held is not None:
        held.enter_context(master_lock(run_dir.master_lock))
    record = run_record(layout, config)
    check_run_dir(run_dir, record)
    run_id = run_dir.run_id() or uuid.uuid4().hex
    owner = RunOwner(run_id, str(run_dir.path.resolve()), socket.gethostname())
    # reach the store and check whose graph it holds before touching the
    # run dir: a bad URI or a store of another run leaves nothing behind
    with run_store(config, run_dir, run_id, first_contact_s=FIRST_CONTACT_S) as store:
        store.check_owner(owner)
        fresh = claim_run_dir(run_dir, record, run_id)
        known = store.claim(owner)
        if fresh or not known:
            store.reset()
    # done markers vouch only for data that is there: a block whose output
    # is gone (or whose graph was lost with the store), and every block
    # built on it, is redone (pipeline/orchestration/resume.py)
    redone = keep_done_blocks(layout, run_dir, layout.block_steps, graph_lost=not fresh and not known)
    if redone:
        print(f"affseg: resuming: redoing blocks whose output is gone or was built on such a block: "
              f"{describe(redone)}", file=sys.stderr)
    run_dir.config.write_text(config.model_dump_json(indent=2))
    _prepare_volumes(layout, run_dir)
    daisy_logging.set_log_basedir(run_dir.logs)
    return layout, run_dir


def run(config: RunConfig, config_source: str) -> dict:
    with ExitStack() as held:
        return _run(config, config_source, held)


def _run(config: RunConfig, config_source: str, held: ExitStack) -> dict:
    layout, run_dir = open_run(config, held)

    vs = layout.voxel_size
    partitioner = layout.partitioner
    blockwise = [step for step in layout.steps(evaluated=config.ground_truth is not None) if step not in partitioner.master_steps]
    voxels = {step: layout.voxels_per_block for step in blockwise}
    if layout.predicted:
        voxels["predict"] = int(np.prod(layout.predict_output / vs))
    progress = ProgressLog(run_dir.progress, blockwise, voxels)
    progress.log_step("run", "start", config=config_source)
    report: dict = {
        "config": config_source,
        "run_dir": str(run_dir.path),
        "volume_voxels": int(np.prod(layout.roi.shape / vs)),
        "steps": {},
    }
    started = time.time()
    partitioner.before_resume(config, run_dir)
    # steps whose every block is done (after open_run's check) skip daisy
    done = {}
    for step in layout.block_steps:
        blocks = finished_blocks(layout, run_dir, step)
        if blocks is not None:
            done[step] = blocks
            report_finished(step, blocks, progress, report)
    pipeline = partitioner.pipeline(config, layout, run_dir, done)
    if pipeline is not None:
        run_daisy(pipeline, progress, report, run_dir.logs)
    partitioner.finish(config, layout, run_dir, progress, report, done)
    if layout.uncertain:
        report["proofreading"] = proofread_run(config, layout, run_dir, progress, report)
    if config.ground_truth:
        report["scores"] = evaluate_run(config, layout, run_dir, progress, report)
    report["wall_s"] = round(time.time() - started, 2)
    write_atomically(run_dir.report, json.dumps(report, indent=2))
    progress.log_step("run", "finish", wall_s=report["wall_s"])
    return report
