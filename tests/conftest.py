"""Shared fixtures: the bundled FIB-SEM sample, run configs, and a real
MongoDB-wire-protocol server (secantus) on 127.0.0.1, or MONGODB_URI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.kernels.rag import offset_pairs
from pipeline.methods import affinity, build_model, save_model

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "data/fib25_medulla/fib25.zarr/raw"
GROUNDTRUTH_H5 = REPO / "data/fib25_medulla/groundtruth.h5"
ISBI = REPO / "data/isbi2012"
NUCLEI = REPO / "data/nuclei_u2os"
MODEL = REPO / "models/fib25_mala.pt"
# the network-free intensity baseline: its predict step takes a fraction of
# a second where the network's takes tens of seconds on a CPU. For tests of
# the job around the network (resume, stores, run identity), which compare a
# run with another run of the same model, never with the network's output
BASELINE = {"model": {"baseline": "intensity"}}

# a 40 x 160 x 160 voxel crop of the held-out sections 120..159
TEST_ROI = {"offset": [1200, 0, 0], "shape": [400, 1600, 1600]}


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """A refused command: exit 2 and one line on stderr naming `message`."""
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("affseg: error: ") and message in lines[0], result.stderr


def affinity_model(spec: dict, offsets):
    """A fresh (untrained) affinity-method model on the backbone `spec`."""
    return build_model(affinity.Settings(), spec, offsets)


def save_affinity_model(path: Path, spec: dict, offsets) -> Path:
    save_model(path, affinity.Settings(), spec, offsets, affinity_model(spec, offsets).state_dict())
    return path


def noisy_ground_truth_affinities(labels: np.ndarray, offsets, noise: float) -> np.ndarray:
    """uint8 affinities by the definition (a_o(i) = 1 iff i and i + o carry
    the same non-zero label; 0 where i + o lies outside), plus Gaussian
    noise. Works for 3D volumes and 2D sections alike."""
    affs = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    for c, offset in enumerate(offsets):
        here, there = offset_pairs(labels.shape, offset)
        affs[c][here] = (labels[here] == labels[there]) & (labels[here] > 0)
    affs += np.random.default_rng(0).normal(0, noise, affs.shape).astype(np.float32)
    return (np.clip(affs, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def labels(tmp_path_factory) -> str:
    """Ground-truth bodies, ingested from the bundled HDF5 with its body map."""
    out = tmp_path_factory.mktemp("gt") / "fib25.zarr" / "labels"
    result = run_cli(
        "pipeline/ingest.py", f"{GROUNDTRUTH_H5}:/stack", "--body-map", f"{GROUNDTRUTH_H5}:/transforms",
        "--out", str(out), "--voxel-size", "10", "10", "10",
    )
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="session")
def isbi(tmp_path_factory) -> tuple[str, str]:
    """ISBI 2012 sections as zarr: (raw, instance labels = connected
    components of each section's interior)."""
    container = tmp_path_factory.mktemp("isbi") / "isbi.zarr"
    for name, extra in (("raw", ()), ("labels", ("--components",))):
        result = run_cli(
            "pipeline/ingest.py", str(ISBI / ("image" if name == "raw" else "label")), "--out", str(container / name),
            "--voxel-size", "50", "4", "4", "--chunk-shape", "1", "512", "512", *extra,
        )
        assert result.returncode == 0, result.stderr
    return str(container / "raw"), str(container / "labels")


@pytest.fixture(scope="session")
def nuclei(tmp_path_factory) -> tuple[str, str]:
    """The U2OS nuclei pages as zarr with the natural 2D voxel size 1 1 1:
    (raw, labels; 0 = background)."""
    container = tmp_path_factory.mktemp("nuclei") / "nuclei.zarr"
    for name in ("raw", "labels"):
        source = NUCLEI / ("image.tif" if name == "raw" else "labels.tif")
        kind = ("--labels",) if name == "labels" else ()
        result = run_cli("pipeline/ingest.py", str(source), *kind, "--out", str(container / name),
                         "--voxel-size", "1", "1", "1", "--chunk-shape", "1", "520", "696")
        assert result.returncode == 0, result.stderr
    return str(container / "raw"), str(container / "labels")


# the test crop's block-wise settings: 2 x 2 x 2 = 8 blocks; context about
# 10 x 30 x 30 voxels, enough for agglomeration near a block border to see
# the objects it joins
PREDICT = {"device": "cpu", "output_shape": [40, 80, 80], "workers": 1}
POSTPROCESS = {"block_shape": [200, 800, 800], "context": [100, 300, 300], "workers": 2}
# the same blocks, every one in the master process (launcher in_process)
IN_PROCESS = {"launcher": {"kind": "in_process"}, "predict": PREDICT, "postprocess": {**POSTPROCESS, "workers": 1}}


@pytest.fixture(scope="session")
def run_config(labels):
    """Writes a run config for the test crop; keyword arguments override keys."""

    def make(path: Path, **overrides) -> Path:
        config = {
            "run_dir": str(path.parent / "run"),
            "raw": str(RAW),
            "ground_truth": labels,
            "roi": TEST_ROI,
            "model": {"checkpoint": str(MODEL)},
            "store": "sqlite",
            "predict": PREDICT,
            "fragments": {"method": "waterz", "epsilon_agglomerate": 0.3},
            # the demo's operating threshold (see the README's results)
            "agglomerate": {"thresholds": [0.3, 0.5, 0.7], "threshold": 0.5},
            "postprocess": POSTPROCESS,
        }
        config.update(overrides)
        path.write_text(json.dumps(config))
        return path

    return make


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory):
    """A MongoDB URI: MONGODB_URI if set, else a secantus server started here."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    from secantus import SecantusDBServer

    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(tmp_path_factory.mktemp("secantus")))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


MONGODB_USER, MONGODB_PASSWORD = "affseg", "S3cret pw/81"


@pytest.fixture(scope="session")
def mongodb_with_password(tmp_path_factory):
    """A MongoDB-wire server that requires a password (MONGODB_USER,
    MONGODB_PASSWORD); its URI has none. Always a local secantus server:
    a test must know the password."""
    import pymongo
    from secantus import SecantusDBServer

    storage = str(tmp_path_factory.mktemp("secantus-auth"))
    # users are made on an open server, which then restarts requiring them
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=storage)
    server.start()
    client = pymongo.MongoClient(server.uri)
    client.admin.command("createUser", MONGODB_USER, pwd=MONGODB_PASSWORD, roles=["root"])
    client.close()
    server.stop()
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=storage, require_auth=True)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


class MongoServerProcess:
    """A MongoDB-wire server (secantus) in a process of its own, which a test
    can freeze (SIGSTOP), kill and start again on the same port and data.

    The server binds its port itself (port 0 the first time) and the port is
    read from its log: a port probed here and handed over could be taken by
    another test's server in between, and this fixture would then talk to
    that one (a frozen-server test once saw its writes succeed that way)."""

    LISTENING = re.compile(r"secantus listening on 127\.0\.0\.1:(\d+)")

    def __init__(self, storage: Path):
        self.storage = storage
        self.log = storage.with_name(storage.name + ".log")
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        import time

        import pymongo

        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(self.port),
                 # durable commits, as mongod's journal: a killed server keeps what it acknowledged
                 "--storage-path", str(self.storage), "--standalone", "--sync-on-commit"],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.time() + 60
        while not (listening := self.LISTENING.search(self.log.read_text())):
            assert self.process.poll() is None, f"the server did not start: {self.log.read_text()[-500:]}"
            assert time.time() < deadline, "the server did not start within 60 s"
            time.sleep(0.05)
        assert self.port in (0, int(listening[1]))
        self.port = int(listening[1])
        pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000).admin.command("ping")

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread of the server has stopped:
        the signal is delivered asynchronously, and on a loaded machine a
        thread still running could answer one more request (a
        frozen-server test once saw its write succeed)."""
        import signal
        import time

        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.time() + 30
        while tasks.exists() and not all(_stopped(task) for task in tasks.iterdir()):
            assert time.time() < deadline, "the server did not stop within 30 s"
            time.sleep(0.01)

    def thaw(self) -> None:
        import signal

        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _stopped(task: Path) -> bool:
    """Whether a thread (/proc/PID/task/TID) is stopped; one that has
    exited meanwhile counts as stopped."""
    try:
        stat = (task / "stat").read_text()
    except FileNotFoundError:
        return True
    # the state follows the command name, which is in parentheses
    return stat[stat.rindex(")") + 2] in "Tt"


@pytest.fixture
def mongodb_process(tmp_path):
    server = MongoServerProcess(tmp_path / "mongodb-data")
    server.start()
    try:
        yield server
    finally:
        server.kill()
