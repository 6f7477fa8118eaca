"""The main job end to end on the real sample (held-out sections 120..159):
report and scores, block-wise vs one block, SQLite vs MongoDB, and
kill-and-resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from funlib.persistence import open_ds, prepare_ds

from pipeline.config import RunConfig
from pipeline.errors import RunFailed
from pipeline.evaluation.metrics import evaluate_arrays
from pipeline.kernels.lut import LookUpTable
from pipeline.orchestration.partitioners import Waterz
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.run_layout import RunDir
from pipeline.status import read_status
from pipeline.storage.graph_store import open_store
from tests.conftest import IN_PROCESS, RAW, REPO, assert_one_line_error, run_cli
from tests.test_lut import reference_segments


def run_predict(config: Path) -> Path:
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(json.loads(config.read_text())["run_dir"])


def volume(run_dir: Path, name: str) -> np.ndarray:
    array = open_ds(run_dir / "volumes.zarr" / name)
    return array[array.roi]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_config) -> Path:
    """An uninterrupted run with 8 post-processing blocks and SQLite."""
    return run_predict(run_config(tmp_path_factory.mktemp("reference") / "config.json"))


def test_run_leaves_segmentation_report_and_scores(reference):
    report = json.loads((reference / "report.json").read_text())
    for step in ("predict", "fragments", "agglomerate", "relabel"):
        assert report["steps"][step]["completed"] == report["steps"][step]["blocks"] > 0
        assert report["steps"][step]["failed"] == 0
        assert report["steps"][step]["peak_worker_rss_bytes"] > 0
    assert report["steps"]["fragments"]["blocks"] == 8
    assert report["steps"]["segments"]["wall_s"] >= 0
    assert [row["threshold"] for row in report["scores"]] == [0.3, 0.5, 0.7]
    for row in report["scores"]:
        assert row["cremi_score"] == pytest.approx(np.sqrt(row["voi"] * row["arand"]))
    segmentation = volume(reference, "segmentation")
    fragments = volume(reference, "fragments")
    assert segmentation.dtype == np.uint64 and segmentation.shape == (40, 160, 160)
    # relabelling only merges fragments: every segment is a union of fragments
    assert len(np.unique(segmentation)) < len(np.unique(fragments))
    assert np.all((segmentation == 0) == (fragments == 0))
    # fragment ids are unique across blocks: each id lies in one block only
    ids_per_block = [set(np.unique(fragments[z:z + 20, y:y + 80, x:x + 80]).tolist()) - {0}
                     for z in (0, 20) for y in (0, 80) for x in (0, 80)]
    assert sum(len(s) for s in ids_per_block) == len(set().union(*ids_per_block))


def test_blockwise_evaluation_equals_the_scores_of_the_whole_volume(reference):
    """The evaluate step's blocks' contingency tables, added up by the
    master, score exactly as the whole segmentation at each threshold does."""
    report = json.loads((reference / "report.json").read_text())
    assert report["steps"]["evaluate"]["completed"] == report["steps"]["evaluate"]["blocks"] == 8
    assert len(list((reference / "evaluation").glob("*.npz"))) == 8
    config = json.loads((reference / "config.json").read_text())
    ground_truth = open_ds(config["ground_truth"])
    fragments = open_ds(reference / "volumes.zarr" / "fragments")
    truth = ground_truth[fragments.roi]
    for row in report["scores"]:
        table = LookUpTable.open(RunDir(reference).lut(Waterz.table(config["agglomerate"]["scoring"], row["threshold"])))
        expected = evaluate_arrays(table.map(fragments[fragments.roi]), truth)
        assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert len({row["voi"] for row in report["scores"]}) == 3


def test_evaluate_scores_against_its_own_ground_truth_and_thresholds(reference, tmp_path):
    """evaluate.py's workers score against the command's config, not the
    run's config.json: here the run's own segmentation (threshold 0.5) as
    ground truth, so that 0.5 scores perfectly and 0.3 does not."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = {**json.loads((run / "config.json").read_text()), "run_dir": str(run)}
    (run / "config.json").write_text(json.dumps(config))
    assert config["agglomerate"]["threshold"] == 0.5 and config["ground_truth"] != str(run / "volumes.zarr/segmentation")
    other = tmp_path / "evaluate.json"
    other.write_text(json.dumps({**config, "ground_truth": str(run / "volumes.zarr/segmentation"),
                                 "agglomerate": {**config["agglomerate"], "thresholds": [0.3, 0.5]}}))
    result = run_cli("pipeline/evaluate.py", str(other), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [row["threshold"] for row in rows] == [0.3, 0.5]
    assert rows[1]["voi"] == pytest.approx(0, abs=1e-9) and rows[1]["arand"] == pytest.approx(0, abs=1e-9)
    assert rows[0]["voi"] > 0.1


def test_look_up_tables_equal_connected_components_of_the_runs_graph(reference):
    """The streamed union-find against its slow reference on the real graph."""
    with open_store("sqlite", reference, RunDir(reference).run_id()) as store:
        ids = store.node_ids()
        graph = [(c.u, c.v, c["merge_score"]) for c in store.stream_edges(["merge_score"])]
        u, v, scores = (np.concatenate(column) for column in zip(*graph))
    assert len(u) > 100
    for threshold in (0.3, 0.5, 0.7):
        table = LookUpTable.open(RunDir(reference).lut(Waterz.table("hist_quant_50", threshold)))
        np.testing.assert_array_equal(table.segments, reference_segments(ids, u, v, scores, threshold))


def test_chunks_tile_the_blocks_and_stay_small(reference):
    """No two blocks' writers share a chunk, and a viewer or a partial read
    fetches 64^3 voxels at most."""
    layout = RunDir(reference).read_layout()
    for name, block in (("affs", layout.predict_output), ("fragments", layout.block_shape), ("segmentation", layout.block_shape)):
        chunks = zarr.open_array(str(reference / "volumes.zarr" / name), mode="r").chunks[-3:]
        blocks = block / layout.voxel_size
        assert all(b % c == 0 and c <= 64 for b, c in zip(blocks, chunks)), (name, chunks, blocks)
        assert chunks != tuple(blocks), name  # the test blocks have divisors below 64


def test_status_reports_every_step_done(reference, run_config, tmp_path):
    status = read_status(reference / "progress.jsonl")
    assert status["finished"]
    for step in ("predict", "fragments", "agglomerate", "relabel"):
        assert status["steps"][step]["state"] == "done"
        assert status["steps"][step]["completed"] == status["steps"][step]["total"]
    config = tmp_path / "config.json"
    config.write_text((reference / "config.json").read_text())
    result = run_cli("pipeline/status.py", str(config))
    assert result.returncode == 0 and "run finished" in result.stdout
    assert "agglomerate done" in " ".join(result.stdout.split())
    assert "evaluate done" in " ".join(result.stdout.split())
    # a run without ground truth has no evaluate step: it is not "waiting"
    config.write_text(json.dumps({**json.loads(config.read_text()), "ground_truth": None}))
    result = run_cli("pipeline/status.py", str(config))
    assert result.returncode == 0 and "run finished" in result.stdout and "evaluate" not in result.stdout


def test_blockwise_matches_one_block_over_the_whole_volume(reference, run_config, tmp_path):
    single = run_predict(run_config(
        tmp_path / "config.json",
        postprocess={"block_shape": [400, 1600, 1600], "context": [30, 100, 100], "workers": 1},
    ))
    np.testing.assert_array_equal(volume(single, "affs"), volume(reference, "affs"))
    one_block, eight_blocks = volume(single, "segmentation"), volume(reference, "segmentation")
    assert json.loads((single / "report.json").read_text())["steps"]["fragments"]["blocks"] == 1
    arand = evaluate_arrays(eight_blocks, one_block)["arand"]
    assert arand < 0.02, f"block-wise segmentation differs from the one-block one: ARAND {arand:.4f}"


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_run_from_given_affinities_equals_the_post_processing_after_predict(dtype, reference, run_config, tmp_path):
    """The reference's affinities as another tool would hand them over: in
    their own container, as uint8 or as floats in [0, 1]."""
    affs = open_ds(reference / "volumes.zarr" / "affs")
    values = affs[affs.roi] if dtype == "uint8" else (affs[affs.roi] / np.float32(255)).astype(dtype)
    given = prepare_ds(tmp_path / "given.zarr" / "affs", shape=values.shape, offset=affs.roi.offset,
                       voxel_size=affs.voxel_size, dtype=dtype, chunk_shape=(values.shape[0], 20, 80, 80), mode="w")
    given[given.roi] = values
    offsets = json.loads((reference / "layout.json").read_text())["offsets"]
    run_dir = run_predict(run_config(tmp_path / "config.json", model=None,
                                     affinities={"dataset": str(tmp_path / "given.zarr" / "affs"), "offsets": offsets}))
    report = json.loads((run_dir / "report.json").read_text())
    assert "predict" not in report["steps"] and not (run_dir / "volumes.zarr" / "affs").exists()
    for name in ("fragments", "segmentation"):
        np.testing.assert_array_equal(volume(run_dir, name), volume(reference, name))
    assert report["scores"] == json.loads((reference / "report.json").read_text())["scores"]


def test_the_3d_mutex_watershed_runs_the_job_and_resumes(reference, run_config, tmp_path):
    """partition mutex_3d on the reference's affinities: its steps, one score
    row at the bias, the segmentation of its one table, and a re-run that
    skips every block; a changed partitioner is refused."""
    offsets = json.loads((reference / "layout.json").read_text())["offsets"]
    given = {"model": None, "affinities": {"dataset": str(reference / "volumes.zarr" / "affs"), "offsets": offsets}}
    mutex = {"partition": "mutex_3d", "mutex": {"biases": [0.0] * 3 + [1.0] * 9, "long_range_stride": [1, 3, 3]},
             "postprocess": {"block_shape": [200, 800, 800], "context": [100, 300, 300], "workers": 2}}
    config = run_config(tmp_path / "config.json", **given, **mutex)
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(mutex watershed)" in result.stdout
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "report.json").read_text())
    # pipelined steps finish in either order
    assert set(report["steps"]) == {"mutex_fragments", "mutex_graph", "segments", "mutex_relabel", "evaluate"}
    assert [row["threshold"] for row in report["scores"]] == [0.5]
    assert 0 < report["graph"]["segments"] < report["graph"]["fragments"]
    assert report["graph"]["small_segments"] > 0
    fragments, segmentation = volume(run_dir, "fragments"), volume(run_dir, "segmentation")
    # the small segments are grown over: none is left, and every voxel has a label
    segments = LookUpTable.open(RunDir(run_dir).lut("mutex")).map(fragments)
    kept = ~np.isin(segments, np.load(run_dir / "luts" / "mutex.small.npy"))
    np.testing.assert_array_equal(segmentation[kept], segments[kept])
    assert (segmentation > 0).all() and np.unique(segmentation, return_counts=True)[1].min() >= 200

    again = run_predict(config)
    steps = json.loads((again / "report.json").read_text())["steps"]
    assert all(steps[s]["skipped"] == steps[s]["blocks"] for s in ("mutex_fragments", "mutex_graph", "mutex_relabel"))
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), segmentation)
    waterz = run_config(tmp_path / "waterz.json", **given, postprocess=mutex["postprocess"])
    assert_one_line_error(run_cli("pipeline/predict.py", str(waterz)), 'was made with partition = "mutex_3d"')


def test_mongodb_store_gives_the_same_segmentation(reference, run_config, tmp_path, mongodb_uri):
    uri = mongodb_uri.rstrip("/") + f"/affseg_{tmp_path.name}"
    mongo = run_predict(run_config(tmp_path / "config.json", store=uri))
    np.testing.assert_array_equal(volume(mongo, "segmentation"), volume(reference, "segmentation"))


def test_killed_run_resumes_to_the_identical_segmentation(reference, run_config, tmp_path):
    config = run_config(tmp_path / "config.json")
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    process = subprocess.Popen(
        [sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 600
    checked = False
    try:
        while time.time() < deadline:
            progress = run_dir / "progress.jsonl"
            records = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
            if not checked and any(r["step"] == "predict" and r.get("completed", 0) >= 2 for r in records):
                # status while the run is going: the step is running, with a
                # speed. Predict is the step to look at: its blocks take
                # seconds each on a CPU, where the 8 fragments blocks can all
                # finish between two polls
                during = read_status(progress)
                assert not during["finished"]
                assert during["steps"]["predict"]["state"] == "running"
                assert during["steps"]["predict"]["completed"] >= 2
                assert during["steps"]["predict"]["voxels_per_s"] > 0
                checked = True
            if checked and any(r["step"] == "fragments" and r.get("completed", 0) >= 2 for r in records):
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
    finally:
        # the whole process group: master and every worker, mid-block
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / "report.json").exists(), "the run finished before the kill"

    run_predict(config)
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))
    steps = json.loads((run_dir / "report.json").read_text())["steps"]
    assert steps["predict"]["skipped"] > 0 and steps["fragments"]["skipped"] >= 2

    # a finished run re-run skips every block and changes nothing
    run_predict(config)
    steps = json.loads((run_dir / "report.json").read_text())["steps"]
    assert all(steps[s]["skipped"] == steps[s]["blocks"] for s in ("predict", "fragments", "agglomerate", "relabel"))
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


def worker_pids(step: str, config: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"workers.{step}".encode() in cmdline and any(str(config.parent).encode() in a for a in cmdline):
            pids.append(int(proc.name))
    return pids


def test_a_killed_worker_is_replaced_and_nothing_is_lost(reference, run_config, tmp_path):
    config = run_config(tmp_path / "config.json")
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        for step in ("predict", "agglomerate"):
            while not (pids := worker_pids(step, run_dir / "config.json")):
                assert process.poll() is None and time.time() < deadline, f"no {step} worker appeared"
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
        assert process.wait(timeout=900) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    steps = json.loads((run_dir / "report.json").read_text())["steps"]
    # one worker of each killed; daisy's own count said 0 for some such runs
    assert steps["predict"]["worker_restarts"] == 1 and steps["agglomerate"]["worker_restarts"] == 1
    # a run that recovered exits 0 without daisy's tracebacks on the terminal (they are in logs/daisy.log)
    assert "Traceback" not in stderr.read_text() and "SIGKILL" in (run_dir / "logs" / "daisy.log").read_text()
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


def test_a_block_that_keeps_failing_fails_the_run_with_its_cause(reference, run_config, tmp_path):
    config = run_config(tmp_path / "config.json")
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    # a file where the directory of the last two fragments chunks must go:
    # every write of those blocks fails, as on a broken disk, and no retry
    # can fix it
    blocker = run_dir / "volumes.zarr" / "fragments" / "1" / "1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("")
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 1
    assert "fragments: 2 of 8 blocks did not finish (KeyError" in result.stderr, result.stderr[-2000:]
    assert "re-run the same command" in result.stderr
    assert not (run_dir / "report.json").exists()

    # repaired, the same command finishes the run, equal to the reference
    blocker.unlink()
    run_predict(config)
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


def test_in_process_runs_every_block_in_the_master_with_the_same_segmentation(reference, run_config, tmp_path):
    """launcher in_process: the same volumes and scores as the reference's
    worker processes, from the master alone (no worker logs), with the
    report's counts and a progress log that status reads as done."""
    config = run_config(tmp_path / "config.json", **IN_PROCESS)
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    process = subprocess.Popen([sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers = set()
    try:
        # a predict block takes seconds here: a worker process would be seen
        while process.poll() is None:
            workers.update(s for s in ("predict", "fragments", "agglomerate", "relabel", "evaluate")
                           if worker_pids(s, run_dir / "config.json"))
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0 and not workers, workers
    for name in ("affs", "fragments", "segmentation"):
        np.testing.assert_array_equal(volume(run_dir, name), volume(reference, name))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["scores"] == json.loads((reference / "report.json").read_text())["scores"]
    for step in ("predict", "fragments", "agglomerate", "relabel", "evaluate"):
        assert report["steps"][step]["completed"] == report["steps"][step]["blocks"] > 0
        assert report["steps"][step]["cpu_s"] > 0
    status = read_status(run_dir / "progress.jsonl")
    assert status["finished"]
    for step in ("predict", "fragments", "agglomerate", "relabel", "evaluate"):
        assert status["steps"][step]["state"] == "done", status
        assert status["steps"][step]["completed"] == status["steps"][step]["total"] > 0


def test_in_process_stops_at_a_failing_block_and_the_rerun_resumes(reference, run_config, tmp_path):
    """A block's exception stops an in_process run with its step, block and
    cause in one line (the traceback in the step's log); the repaired
    re-run does only what is left and equals the reference."""
    offsets = json.loads((reference / "layout.json").read_text())["offsets"]
    config = run_config(tmp_path / "config.json", **IN_PROCESS, model=None,
                        affinities={"dataset": str(reference / "volumes.zarr" / "affs"), "offsets": offsets})
    run_dir = tmp_path / "run"
    blocker = run_dir / "volumes.zarr" / "fragments" / "1" / "1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("")
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 1
    assert "run failed: fragments: block" in result.stderr and "failed (KeyError" in result.stderr, result.stderr[-2000:]
    assert "Traceback" in (run_dir / "logs" / "fragments" / "in_process.err").read_text()
    assert not (run_dir / "report.json").exists()

    blocker.unlink()
    run_predict(config)
    report = json.loads((run_dir / "report.json").read_text())
    assert 0 < report["steps"]["fragments"]["skipped"] < report["steps"]["fragments"]["blocks"]
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


@pytest.mark.parametrize("chunk", [
    # sections 128..159, y and x 64..127: inside the test ROI, and none of
    # the master's samples
    "2/1/1",
    # a chunk the master reads to identify the raw volume
    "2/0/0",
])
def test_a_corrupt_raw_chunk_names_the_dataset_and_where(chunk, run_config, tmp_path):
    raw = tmp_path / "raw.zarr" / "raw"
    shutil.copytree(RAW, raw)
    (raw / chunk).write_bytes(b"not a blosc frame" * 64)
    config = run_config(tmp_path / "config.json", raw=str(raw))
    result = run_cli("pipeline/predict.py", str(config))
    if chunk == "2/0/0":
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"affseg: error: raw: cannot read {raw} at [1440:1600, 0:160, 0:160]" in result.stderr
        return
    assert result.returncode == 1, result.stderr[-2000:]
    failure = next(line for line in result.stderr.splitlines() if line.startswith("affseg: run failed"))
    # every predict block's raw read (block + network context) meets the chunk
    assert f"predict: 4 of 4 blocks did not finish (pipeline.storage.volumes.VolumeReadError: cannot read {raw} at [" in failure, failure
    assert "error during blosc decompression" in failure


def test_blocks_that_time_out_fail_the_run_saying_so(run_config, tmp_path):
    # one predict block of the whole crop takes several seconds on any CPU
    config = run_config(tmp_path / "config.json", block_timeout_s=1,
                        predict={"device": "cpu", "output_shape": [40, 160, 160], "workers": 1})
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 1, result.stderr[-2000:]
    failure = next(line for line in result.stderr.splitlines() if line.startswith("affseg: run failed"))
    assert "predict: 1 of 1 blocks did not finish (" in failure and "timed out after 1 s" in failure, failure


def test_mongodb_killed_mid_step_and_restarted_loses_nothing(reference, run_config, tmp_path, mongodb_process):
    config = run_config(tmp_path / "config.json", store=mongodb_process.uri)
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            progress = run_dir / "progress.jsonl"
            records = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
            if any(r["step"] == "agglomerate" and r.get("completed", 0) >= 1 for r in records):
                break
            assert process.poll() is None and time.time() < deadline, "the run ended before agglomerate"
            time.sleep(0.05)
        mongodb_process.kill()
        time.sleep(5)
        mongodb_process.start()
        code = process.wait(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # the store's retries may ride out the outage, or blocks fail and the
    # same command finishes them
    if code != 0:
        assert code == 1, stderr.read_text()[-2000:]
        run_predict(config)
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


def test_a_store_lost_after_the_run_reached_it_fails_the_run_for_a_re_run_not_as_a_bad_config(run_config, tmp_path,
                                                                                                mongodb_process):
    # CI once killed the server just before the master's segments step: the
    # run said "cannot reach MongoDB" as for a wrong URI (exit 2), not that
    # a re-run resumes (exit 1)
    path = run_config(tmp_path / "config.json", store=mongodb_process.uri, store_timeout_s=1, **IN_PROCESS)
    run_dir = RunDir(run_predict(path))
    mongodb_process.kill()
    # a re-run that cannot reach the store at its start: as a wrong URI
    result = run_cli("pipeline/predict.py", str(path))
    assert_one_line_error(result, "store: cannot reach MongoDB at")
    # the server gone after the start: the master's segments step, as the
    # re-run that found it would run it
    config, layout = RunConfig(**json.loads(path.read_text())), run_dir.read_layout()
    progress = ProgressLog(run_dir.progress, ["segments"], {}, bars=False)
    with pytest.raises(RunFailed, match=r"^segments: store: MongoDB at mongodb://127\.0\.0\.1:\d+/ stopped answering "
                                        r"\(ServerSelectionTimeoutError\)$"):
        layout.partitioner.finish(config, layout, run_dir, progress, {"steps": {}}, done=set(layout.block_steps))
    mongodb_process.start()
    assert run_cli("pipeline/predict.py", str(path)).returncode == 0


def _on_a_cluster() -> dict:
    """The environment of a login node: `sbatch` and `bsub` on PATH (the
    stand-ins in tests/cluster_standins run jobs here as the real ones do)."""
    return {**os.environ, "PATH": f"{REPO / 'tests' / 'cluster_standins'}{os.pathsep}{os.environ['PATH']}"}


def test_slurm_runs_the_job_and_a_failed_blocks_cause_is_found_in_its_job_log(reference, run_config, tmp_path, mongodb_uri):
    config = run_config(tmp_path / "config.json", store=mongodb_uri.rstrip("/") + f"/slurm_{tmp_path.name}",
                        launcher={"kind": "slurm"})
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    blocker = run_dir / "volumes.zarr" / "fragments" / "1" / "1"  # as in the test above
    blocker.parent.mkdir(parents=True)
    blocker.write_text("")
    result = run_cli("pipeline/predict.py", str(config), env=_on_a_cluster())
    assert result.returncode == 1, result.stderr[-2000:]
    # the worker ran inside a SLURM job: its traceback is in the job's error file
    assert "fragments: 2 of 8 blocks did not finish (KeyError" in result.stderr, result.stderr[-2000:]
    assert any("KeyError" in p.read_text() for p in (run_dir / "logs" / "fragments").glob("slurm-*.err"))

    blocker.unlink()
    result = run_cli("pipeline/predict.py", str(config), env=_on_a_cluster())
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))


def test_lsf_runs_the_job_with_a_log_per_job(reference, run_config, tmp_path, mongodb_uri):
    config = run_config(tmp_path / "config.json", store=mongodb_uri.rstrip("/") + f"/lsf_{tmp_path.name}",
                        launcher={"kind": "lsf"})
    result = run_cli("pipeline/predict.py", str(config), env=_on_a_cluster())
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(reference, "segmentation"))
    for step in ("predict", "fragments", "agglomerate", "relabel"):
        assert list((run_dir / "logs" / step).glob("lsf-*.out")), step


def _retrained(config: dict, tmp_path: Path) -> None:
    """The same network with other weights, as after retraining."""
    model = torch.load(config["model"]["checkpoint"], map_location="cpu", weights_only=True)
    model["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in model["state_dict"].items()}
    torch.save(model, tmp_path / "retrained.pt")
    config["model"]["checkpoint"] = str(tmp_path / "retrained.pt")


@pytest.mark.parametrize("change, key", [
    (lambda config, tmp_path: config["postprocess"].update(block_shape=[200, 400, 400]), "block_shape"),
    (_retrained, "model"),
    (lambda config, tmp_path: config["fragments"].update(epsilon_agglomerate=0.2), "fragments"),
])
def test_changing_what_finished_blocks_depend_on_is_refused(reference, tmp_path, change, key):
    config = json.loads((reference / "config.json").read_text())
    change(config, tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run_cli("pipeline/predict.py", str(path))
    assert result.returncode == 2
    assert f"was made with {key} = " in result.stderr and "changing it is refused" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
