"""The main job: raw EM volume in, (evaluated) segmentation out, block by block.

    python pipeline/predict.py CONFIG

Steps: predict -> fragments -> agglomerate (daisy, pipelined block by block),
segments (look-up tables), relabel (daisy), evaluate (with ground truth).
A config with `affinities` (made elsewhere) in place of `model` starts at
fragments.
A 2D model (in-plane offsets only) runs predict -> mutex (mutex watershed
per section, then small-segment merging) -> evaluate instead.
Everything lands in the config's run_dir. Re-running the same command after
a crash or Ctrl-C resumes: finished blocks are skipped. `status.py CONFIG`
shows progress from another terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import socket
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/predict.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import daisy
import numpy as np
from daisy import logging as daisy_logging

from pipeline.cli import cli_main
from pipeline.config import RunConfig, load_json
from pipeline.evaluate import evaluate_run, format_table
from pipeline.storage.graph_store import FIRST_CONTACT_S, RunOwner
from pipeline.orchestration.master_lock import master_lock
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.run_layout import RunDir, RunLayout, check_run_dir, claim_run_dir, run_record, run_store
from pipeline.orchestration.segments import write_luts
from pipeline.orchestration.supervisor import supervise
from pipeline.orchestration.tasks import graph_pipeline, mutex_pipeline, relabel_task
from pipeline.storage.credentials import move_inline_password
from pipeline.storage.volumes import prepare_volume

EXIT_FAILED = 1


class RunFailed(Exception):
    pass


def _prepare_volumes(layout: RunLayout, run_dir: RunDir) -> None:
    vs = layout.voxel_size
    if layout.predicted:
        prepare_volume(run_dir.volumes, "affs", layout.roi, vs, "uint8", layout.predict_output, channels=len(layout.offsets))
    for name, channels, dtype in layout.extras:
        prepare_volume(run_dir.volumes, name, layout.roi, vs, dtype, layout.predict_output, channels=channels)
    for name in ("segmentation",) if layout.is_2d else ("fragments", "segmentation"):
        prepare_volume(run_dir.volumes, name, layout.roi, vs, "uint64", layout.block_shape)


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def _worker_error(logs: Path, step: str) -> str | None:
    """The last exception a worker of `step` logged: daisy only knows that
    the worker command failed, the cause is in the worker's stderr."""
    found = None
    for path in sorted((logs / step).glob("*.err"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text(errors="replace").splitlines():
            if _ERROR_LINE.match(line) and not line.startswith("subprocess.CalledProcessError"):
                found = line.strip()
    return found


def _run_daisy(pipeline, progress: ProgressLog, report: dict, logs: Path) -> None:
    server = daisy.Server()
    states = server.run_blockwise(pipeline, progress=progress, summary=False)
    per_task = (server.last_tracking_summary or {}).get("per_task", {})
    failed = []
    for step, state in states.items():
        blocks = int(state.completed_count)
        fresh = blocks - int(state.skipped_count)
        wall = progress.wall_time(step)
        report["steps"][step] = {
            "blocks": int(state.total_block_count),
            "completed": blocks,
            "skipped": int(state.skipped_count),
            "failed": int(state.failed_count),
            "orphaned": int(state.orphaned_count),
            "worker_restarts": int(state.worker_restart_count),
            "wall_s": round(wall, 2),
            "voxels_per_s": round(fresh * progress.voxels_per_block[step] / wall, 1) if wall > 0 else None,
            # in-block CPU seconds summed over workers: throughput per core
            # is voxels / cpu_s, whatever the number of workers
            "cpu_s": round(float(per_task.get(step, {}).get("total_cpu_secs", 0.0)), 2),
            "peak_worker_rss_bytes": int(per_task.get(step, {}).get("max_peak_rss_bytes", 0)),
        }
        if blocks != state.total_block_count:
            if state.timeout_reclaim_count:
                # the worker was stopped mid-block: its log holds no error
                cause = (f"{state.timeout_reclaim_count} block attempt(s) timed out after {state.timeout_secs:g} s; "
                         f"raise block_timeout_s if blocks are this slow")
            else:
                cause = _worker_error(logs, step)
            failed.append(
                f"{step}: {state.total_block_count - blocks} of {state.total_block_count} blocks did not finish"
                + (f" ({cause})" if cause else "")
            )
    if failed:
        raise RunFailed("; ".join(failed))


def _master_step(step: str, progress: ProgressLog, report: dict, function):
    progress.log_step(step, "start")
    started = time.time()
    result = function()
    wall = time.time() - started
    report["steps"][step] = {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    progress.log_step(step, "finish", wall_s=round(wall, 2))
    return result


def open_run(config: RunConfig, held: ExitStack | None = None) -> tuple[RunLayout, RunDir]:
    """Check the config against the data, claim (or re-open) the run
    directory, and prepare its volumes: everything before the first block.
    A master passes `held`, which keeps the run directory's master lock
    until the master is done."""
    layout = RunLayout.from_config(config)
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
    with run_store(config, run_dir, run_id, reach_s=FIRST_CONTACT_S) as store:
        store.check_owner(owner)
        fresh = claim_run_dir(run_dir, record, run_id)
        known = store.claim(owner)
        if fresh or not known:
            store.reset()
        if not fresh and not known:
            # the graph of finished blocks is gone: redo every step that
            # wrote to it or read from it
            for step in ("fragments", "agglomerate", "relabel"):
                shutil.rmtree(run_dir.tracking(step), ignore_errors=True)
            run_dir.relabel_target.unlink(missing_ok=True)
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
    blockwise = [step for step in layout.steps if step not in ("segments", "evaluate")]
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
    if layout.is_2d:
        _run_daisy(mutex_pipeline(config, layout, run_dir), progress, report, run_dir.logs)
    else:
        _run_daisy(graph_pipeline(config, layout, run_dir), progress, report, run_dir.logs)
        with run_store(config, run_dir) as store:
            report["graph"] = _master_step("segments", progress, report, lambda: write_luts(config, layout, run_dir, store))
        _run_daisy(relabel_task(config, layout, run_dir), progress, report, run_dir.logs)
    if config.ground_truth:
        report["scores"] = _master_step("evaluate", progress, report, lambda: evaluate_run(config))
    report["wall_s"] = round(time.time() - started, 2)
    tmp = run_dir.report.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(run_dir.report)
    progress.log_step("run", "finish", wall_s=report["wall_s"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python pipeline/predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config JSON (see configs/demo.json and the README's config reference)")
    args = parser.parse_args()
    config = RunConfig(**load_json(args.config))
    # before anything is written or printed: see pipeline/storage/credentials.py
    config = config.model_copy(update={"store": move_inline_password(config.store)})
    supervisor_exit = supervise(Path(config.run_dir))
    if supervisor_exit is not None:
        return supervisor_exit
    try:
        report = run(config, str(Path(args.config).absolute()))
    except RunFailed as e:
        print(f"affseg: run failed: {e}\nworker logs: {Path(config.run_dir) / 'logs'}; "
              "re-run the same command to retry the unfinished blocks", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\naffseg: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    run_dir = RunDir(Path(config.run_dir))
    chosen = "mutex watershed" if run_dir.read_layout().is_2d else f"threshold {config.agglomerate.threshold}"
    print(f"\nsegmentation: {run_dir.volumes / 'segmentation'} ({chosen}); report: {run_dir.report}")
    if "scores" in report:
        print(format_table(report["scores"]))
    return 0


if __name__ == "__main__":
    cli_main(main)
