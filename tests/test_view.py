"""The viewer serves a run's datasets: the data it sends for a layer equals
the zarr content (HTTP requests of chunks on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
import zlib

import numpy as np
from funlib.persistence import open_ds

from pipeline.config import RunConfig, load_json
from pipeline.orchestration.job import open_run
from pipeline.storage.volumes import prepare_volume
from tests.conftest import REPO, run_cli


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_the_viewer_serves_each_dataset_as_stored(tmp_path, run_config):
    config = run_config(tmp_path / "config.json")
    layout, run_dir = open_run(RunConfig(**load_json(config)))
    rng = np.random.default_rng(0)
    written = {}
    for name in ("affs", "fragments", "segmentation"):
        array = open_ds(run_dir.volumes / name, mode="r+")
        high = 255 if name == "affs" else 2**40
        written[name] = rng.integers(0, high, array.shape, dtype=array.dtype)
        array[array.roi] = written[name]

    # what an embedding model adds: float16, which neuroglancer gets as float32
    embedding = prepare_volume(run_dir.volumes, "embedding", layout.roi, layout.voxel_size, "float16",
                               layout.block_shape, channels=4)
    written["embedding"] = rng.normal(size=embedding.shape).astype(np.float16)
    embedding[embedding.roi] = written["embedding"]

    viewer = subprocess.Popen([sys.executable, "pipeline/view.py", str(config), "--port", "0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "serving until Ctrl-C":
            line = viewer.stdout.readline()
            assert line, viewer.stderr.read()
            lines.append(line.rstrip("\n"))
        assert lines[0].startswith("neuroglancer: http://127.0.0.1:")
        layers = {line.split()[0]: line.split()[-1] for line in lines[1:-1]}
        assert list(layers) == ["raw", "affs", "embedding", "fragments", "segmentation"]

        raw = open_ds(json.loads(config.read_text())["raw"])
        written["raw"] = raw[raw.roi]
        for name, info_url in layers.items():
            info = json.loads(_fetch(info_url))
            assert tuple(info["shape"]) == written[name].shape, name
            assert info["dataType"] == ("float32" if name == "embedding" else written[name].dtype.name), name
            # a chunk away from the origin, in array indices
            start = [s // 4 for s in written[name].shape]
            end = [min(a + 16, s) for a, s in zip(start, written[name].shape)]
            if len(start) == 4:
                start[0], end[0] = 0, written[name].shape[0]
            # the encoding the info advertises, which the browser asks for
            assert info["encoding"] == "npz"
            chunk_url = info_url.replace("/info/", "/npz/") + f"/{','.join(['1'] * len(start))}/" \
                + ",".join(map(str, start)) + "/" + ",".join(map(str, end))
            served = np.load(io.BytesIO(zlib.decompress(_fetch(chunk_url))))
            expected = written[name][tuple(slice(a, b) for a, b in zip(start, end))]
            np.testing.assert_array_equal(served, expected, err_msg=name)
    finally:
        viewer.kill()
        viewer.wait()


def test_viewing_a_run_that_does_not_exist_is_one_line(tmp_path, run_config):
    result = run_cli("pipeline/view.py", str(run_config(tmp_path / "config.json")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"affseg: error: run_dir: {tmp_path / 'run'} holds no run; run pipeline/predict.py first"
    ]


def test_the_proofreading_list_is_a_layer_of_points(tmp_path, run_config):
    """The top of a run's proofreading list, in world units, most uncertain first."""
    from pipeline.view import serve

    config = RunConfig(**load_json(run_config(tmp_path / "config.json")))
    _, run_dir = open_run(config)
    run_dir.proofreading.mkdir()
    (run_dir.proofreading / "segments.csv").write_text(
        "segment,voxels,z,y,x,contact_pairs,uncertainty\n7,100,1210.0,30.5,44.0,40,0.2\n9,50,1300.0,10.0,20.0,8,0.1\n")
    (run_dir.proofreading / "edges.csv").write_text("segment_a,segment_b,z,y,x,pairs,uncertainty\n7,9,1250.0,20.0,30.0,6,0.15\n")
    viewer, lines = serve(config, "127.0.0.1", 0)
    layer = viewer.state.layers["proofreading"]
    assert [list(a.point) for a in layer.annotations] == [[1210.0, 30.5, 44.0], [1300.0, 10.0, 20.0], [1250.0, 20.0, 30.0]]
    assert layer.annotations[0].description == "segment 7: uncertainty 0.2, 100 voxels"
    assert layer.annotations[2].description == "contact 7 / 9: uncertainty 0.15, 6 pairs"
    assert lines[-1].startswith("  proofreading  3 points")
