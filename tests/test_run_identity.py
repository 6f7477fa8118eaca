"""A run's results belong to that run: its MongoDB graph is its own, a
threshold names exactly one look-up table, and a changed raw volume is
refused. Each of these once gave a wrong segmentation with exit 0."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pymongo
from funlib.persistence import open_ds

from pipeline.config import RunConfig, load_json
from pipeline.kernels.lut import LookUpTable
from pipeline.orchestration.partitioners import Waterz
from pipeline.orchestration.run_layout import RunDir
from pipeline.orchestration.job import open_run
from tests.conftest import BASELINE, IN_PROCESS, RAW, REPO, assert_one_line_error, run_cli


# the jobs below run in one process (IN_PROCESS): these tests are about what
# a run's results belong to, not how its blocks are run


def run_predict(config: Path) -> dict:
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(json.loads(config.read_text())["run_dir"]) / "report.json").read_text())


def one_line_refusal(config: Path, message: str) -> None:
    assert_one_line_error(run_cli("pipeline/predict.py", str(config)), message)


def test_runs_with_the_same_folder_name_keep_their_own_graphs(tmp_path, run_config, mongodb_uri):
    """`a/exp` and `b/exp` on one server with no database in the URI: the
    second run must not reset the first's graph (it once did, and the first
    run's re-run printed other scores with exit 0)."""
    uri = mongodb_uri.rstrip("/") + "/"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = run_config(tmp_path / "a" / "config.json", run_dir=str(tmp_path / "a" / "exp"), store=uri, **BASELINE,
                       **IN_PROCESS)
    # another epsilon: another graph, so a mix-up changes the scores
    second = run_config(tmp_path / "b" / "config.json", run_dir=str(tmp_path / "b" / "exp"), store=uri,
                        fragments={"method": "waterz", "epsilon_agglomerate": 0.1}, **BASELINE, **IN_PROCESS)
    before = run_predict(first)["scores"]
    run_predict(second)
    again = run_predict(first)
    assert again["steps"]["fragments"]["skipped"] == again["steps"]["fragments"]["blocks"]
    assert again["scores"] == before

    client = pymongo.MongoClient(uri)
    try:
        owners = {}
        for name in client.list_database_names():
            record = client[name]["owner"].find_one({"_id": "owner"})
            if record and record["run_dir"].startswith(str(tmp_path)):
                owners[record["run_dir"]] = name
    finally:
        client.close()
    assert sorted(owners) == [str((tmp_path / "a" / "exp").resolve()), str((tmp_path / "b" / "exp").resolve())]
    assert len(set(owners.values())) == 2


def test_a_database_of_another_run_is_refused(tmp_path, run_config, mongodb_uri):
    uri = mongodb_uri.rstrip("/") + f"/shared_{tmp_path.name}"
    first = run_config(tmp_path / "a.json", run_dir=str(tmp_path / "a"), store=uri)
    open_run(RunConfig(**load_json(first)))
    second = run_config(tmp_path / "b.json", run_dir=str(tmp_path / "b"), store=uri)
    one_line_refusal(second, f"belongs to the run in {(tmp_path / 'a').resolve()}")
    assert not (tmp_path / "b" / "layout.json").exists()


def test_a_resumed_run_whose_graph_was_lost_redoes_the_graph_steps(tmp_path, run_config):
    config = run_config(tmp_path / "config.json", **BASELINE, **IN_PROCESS)
    run_dir = tmp_path / "run"
    before = run_predict(config)["scores"]
    (run_dir / "graph.sqlite").unlink()
    again = run_predict(config)
    assert again["steps"]["fragments"]["skipped"] == 0 and again["steps"]["agglomerate"]["skipped"] == 0
    assert again["steps"]["predict"]["skipped"] == again["steps"]["predict"]["blocks"]
    assert again["scores"] == before


def test_close_thresholds_keep_their_own_tables_and_relabel_follows_the_chosen_one(tmp_path, run_config):
    """0.3205 and 0.3245 once shared the table named '0.32' (they straddle a
    step of waterz's 256-bin histogram scores, so their tables differ); and
    going back to a threshold relabelled before skipped relabel, leaving the
    other one's segmentation."""
    thresholds = [0.3205, 0.3245, 0.5]
    run_dir = RunDir(tmp_path / "run")
    counts = {}
    for chosen in (0.3205, 0.3245, 0.3205):
        config = run_config(tmp_path / "config.json", agglomerate={"thresholds": thresholds, "threshold": chosen},
                            **BASELINE, **IN_PROCESS)
        report = run_predict(config)
        assert report["steps"]["relabel"]["skipped"] == 0
        fragments = open_ds(run_dir.volumes / "fragments")
        segmentation = open_ds(run_dir.volumes / "segmentation")
        expected = LookUpTable.open(run_dir.lut(Waterz.table("hist_quant_50", chosen))).map(fragments[fragments.roi])
        np.testing.assert_array_equal(segmentation[segmentation.roi], expected)
        counts[chosen] = report["graph"]["segments@" + repr(chosen)]
    assert (run_dir.path / "luts/hist_quant_50/0.3205.npy").exists()
    assert (run_dir.path / "luts/hist_quant_50/0.3245.npy").exists()
    # the two tables differ on this volume, so a shared one would show
    assert counts[0.3205] != counts[0.3245]
    table = [row["threshold"] for row in report["scores"]]
    assert table == thresholds


def test_the_run_record_holds_the_chosen_partitioners_settings_only(tmp_path, run_config):
    """A waterz run depends on its fragments settings, never on the mutex
    ones (changing mutex.bias on a 3D run was once refused); a directory
    from before the partition choice is read as the partitioner its offsets
    called for."""
    config = run_config(tmp_path / "config.json", **BASELINE)
    open_run(RunConfig(**load_json(config)))
    recorded = json.loads((tmp_path / "run" / "layout.json").read_text())
    assert recorded["partition"] == "waterz" and "mutex" not in recorded

    other_mutex = run_config(tmp_path / "mutex.json", mutex={"bias": 0.3}, **BASELINE)
    open_run(RunConfig(**load_json(other_mutex)))
    other_fragments = run_config(tmp_path / "fragments.json", fragments={"method": "waterz", "epsilon_agglomerate": 0.2},
                                 **BASELINE)
    one_line_refusal(other_fragments, "was made with fragments = ")

    del recorded["partition"]
    (tmp_path / "run" / "layout.json").write_text(json.dumps(recorded))
    layout, _ = open_run(RunConfig(**load_json(config)))
    assert layout.partition == "waterz"
    explicit = run_config(tmp_path / "explicit.json", partition="waterz", **BASELINE)
    open_run(RunConfig(**load_json(explicit)))


def test_a_changed_raw_volume_is_refused(tmp_path, run_config):
    raw = tmp_path / "raw.zarr" / "raw"
    shutil.copytree(RAW, raw)
    config = run_config(tmp_path / "config.json", raw=str(raw))
    open_run(RunConfig(**load_json(config)))

    # same path, same geometry, other voxels
    array = open_ds(raw, mode="r+")
    array[array.roi] = 255 - array[array.roi]
    one_line_refusal(config, "was made with raw = ")
    # another path
    moved = run_config(tmp_path / "config.json", raw=str(RAW))
    one_line_refusal(moved, "was made with raw = ")


def test_one_master_per_run_directory_and_a_dead_masters_lock_is_taken_over(tmp_path, run_config):
    # the network's predict step keeps the first master busy while the
    # second is refused
    config = run_config(tmp_path / "config.json")
    first = subprocess.Popen([sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "progress.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the first master did not start its run"
            time.sleep(0.1)
        # the master is the supervisor's child (pipeline/orchestration/supervisor.py)
        holder = json.loads((tmp_path / "run" / "master.lock").read_text())["pid"]
        assert int(Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[1]) == first.pid
        one_line_refusal(config, f"is in use by the master on {socket.gethostname()}, PID {holder}, since ")
    finally:
        # killed while holding the lock: nothing releases it but its death
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert "scores" in run_predict(config)


def test_a_master_that_dies_of_a_signal_is_explained_in_one_line(tmp_path, run_config):
    """A full file system kills the master with SIGBUS inside daisy's native
    code, without a word (reproduced on a full tmpfs); here the signal is
    sent to the master directly."""
    config = run_config(tmp_path / "config.json")
    supervisor = subprocess.Popen([sys.executable, "pipeline/predict.py", str(config)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = tmp_path / "run" / "master.lock"
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text()):
            assert supervisor.poll() is None and time.time() < deadline, "the master did not start"
            time.sleep(0.1)
        os.kill(json.loads(lock.read_text())["pid"], signal.SIGBUS)
        _, stderr = supervisor.communicate(timeout=300)
    finally:
        # the master's workers, orphaned
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)
    assert supervisor.returncode == 1
    # the master's progress bars, and whatever its orphaned worker processes
    # print as they stop, share the terminal: the supervisor's is the one
    # affseg line
    lines = [line for line in stderr.splitlines() if line.startswith("affseg")]
    assert len(lines) == 1 and lines[0].startswith(
        f"affseg: run failed: the master died of SIGBUS, which happens when the file system of {tmp_path / 'run'} is full ("
    ), stderr[-2000:]
