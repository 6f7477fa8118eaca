"""A finished run whose outputs were deleted or damaged, run again: the
done markers of blocks whose output is gone, and of every block built on
them, are cleared, so the result equals the undamaged run's. Each case once
gave an empty or holed segmentation with exit 0."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import daisy
import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from pipeline.config import RunConfig
from pipeline.errors import RunFailed
from pipeline.kernels.lut import LookUpTable
from pipeline.orchestration.progress import ProgressLog
from pipeline.orchestration.resume import Cells, DoneMarkers, _box_sums
from pipeline.orchestration.run_layout import RunDir, RunLayout
from pipeline.storage.graph_store import open_store
from pipeline.orchestration.tasks import step_geometry
from tests.conftest import BASELINE, run_cli


def run_predict(config: Path) -> tuple[dict, str]:
    result = run_cli("pipeline/predict.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(json.loads(config.read_text())["run_dir"])
    return json.loads((run_dir / "report.json").read_text()), result.stderr


def volume(run_dir: Path, name: str) -> np.ndarray:
    array = open_ds(run_dir / "volumes.zarr" / name)
    return array[array.roi]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, run_config) -> Path:
    """A finished run of the test crop (8 post-processing blocks, SQLite),
    with the network-free baseline model: what matters here is that a
    repaired run equals it, and the baseline predicts in a fraction of a
    second."""
    config = run_config(tmp_path_factory.mktemp("finished") / "config.json", **BASELINE)
    run_predict(config)
    return Path(json.loads(config.read_text())["run_dir"])


def copy_of(finished: Path, run_config, tmp_path: Path, **overrides) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    # no ground truth: the repaired volumes are compared with the finished ones
    return run_config(tmp_path / "config.json", **{**BASELINE, "ground_truth": None, **overrides}), run_dir


def skipped(report: dict, step: str) -> int:
    return report["steps"][step]["skipped"]


def test_deleted_affinities_and_graph_are_redone_not_built_on(finished, run_config, tmp_path):
    """Deleted to free space: predict's markers remained, fragments were
    redone on a recreated empty `affs`, and the segmentation became all 0."""
    config, run_dir = copy_of(finished, run_config, tmp_path)
    shutil.rmtree(run_dir / "volumes.zarr" / "affs")
    (run_dir / "graph.sqlite").unlink()
    report, stderr = run_predict(config)
    assert skipped(report, "predict") == 0 and skipped(report, "fragments") == 0 and skipped(report, "relabel") == 0
    assert "affseg: resuming: redoing blocks whose output is gone or was built on such a block: predict 4," in stderr
    for name in ("affs", "fragments", "segmentation"):
        np.testing.assert_array_equal(volume(run_dir, name), volume(finished, name))


def test_a_graph_lost_during_the_run_fails_its_segments_step_instead_of_segmenting_what_is_left(finished, run_config,
                                                                                                    tmp_path):
    """A MongoDB server back without its data while workers still wrote:
    the run once exited 0 with 5566 segments where the undamaged run has
    2610 (the blocks written after the loss only). Here graph.sqlite is
    deleted and one block's records come back, as a worker would write them,
    before the master's segments step."""
    config_path, run_dir = copy_of(finished, run_config, tmp_path)
    config, directory = RunConfig(**json.loads(config_path.read_text())), RunDir(run_dir)
    (run_dir / "graph.sqlite").unlink()
    with open_store("sqlite", run_dir, directory.run_id()) as store, \
            open_store("sqlite", finished, RunDir(finished).run_id()) as kept:
        store.write_nodes(0, kept.read_nodes([0]))
    layout = directory.read_layout()
    progress = ProgressLog(directory.progress, ["segments"], {}, bars=False)
    with pytest.raises(RunFailed, match=r"^segments: store: .*graph\.sqlite lost this run's graph during the run \(its "
                                        r"owner record is gone\); empty it .* the run then redoes its graph steps$"):
        layout.partitioner.finish(config, layout, directory, progress, {"steps": {}}, done=set(layout.block_steps))
    # as the line says: emptied, the re-run redoes the graph and equals the undamaged run
    (run_dir / "graph.sqlite").unlink()
    report, stderr = run_predict(config_path)
    assert "redoing blocks whose output is gone or was built on such a block: fragments 8, agglomerate 8" in stderr
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(finished, "segmentation"))


def test_deleted_fragments_with_another_threshold_are_redone(finished, run_config, tmp_path):
    config, run_dir = copy_of(finished, run_config, tmp_path, agglomerate={"thresholds": [0.3, 0.5, 0.7], "threshold": 0.3})
    shutil.rmtree(run_dir / "volumes.zarr" / "fragments")
    report, _ = run_predict(config)
    assert skipped(report, "predict") == report["steps"]["predict"]["blocks"]
    assert skipped(report, "fragments") == 0 and skipped(report, "agglomerate") == 0
    np.testing.assert_array_equal(volume(run_dir, "fragments"), volume(finished, "fragments"))
    # the finished run's own table for 0.3, through its fragments
    expected = LookUpTable.open(finished / "luts/hist_quant_50/0.3.npy").map(volume(finished, "fragments"))
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), expected)
    assert len(np.unique(expected)) > 10


def test_one_deleted_fragments_chunk_redoes_its_block_and_what_was_built_on_it(finished, run_config, tmp_path):
    config, run_dir = copy_of(finished, run_config, tmp_path)
    # sections 0..19 of the crop, y and x 0..39: inside fragments block 0
    (run_dir / "volumes.zarr" / "fragments" / "0" / "0" / "0").unlink()
    report, stderr = run_predict(config)
    assert skipped(report, "predict") == report["steps"]["predict"]["blocks"]
    assert skipped(report, "fragments") == 7
    # the context of every agglomerate block of this small crop meets block 0,
    # and the look-up tables read the whole graph
    assert skipped(report, "agglomerate") == 0 and skipped(report, "relabel") == 0
    assert "fragments 1, agglomerate 8, relabel 8" in stderr
    for name in ("fragments", "segmentation"):
        np.testing.assert_array_equal(volume(run_dir, name), volume(finished, name))


def test_one_deleted_segmentation_chunk_is_relabelled(finished, run_config, tmp_path):
    config, run_dir = copy_of(finished, run_config, tmp_path)
    (run_dir / "volumes.zarr" / "segmentation" / "1" / "1" / "1").unlink()
    report, stderr = run_predict(config)
    assert skipped(report, "fragments") == 8 and skipped(report, "agglomerate") == 8
    assert skipped(report, "relabel") == 7
    assert "relabel 1" in stderr
    np.testing.assert_array_equal(volume(run_dir, "segmentation"), volume(finished, "segmentation"))


def test_done_markers_are_read_and_cleared_as_daisy_keeps_them(tmp_path):
    """The marker layout is daisy's: a block whose marker is cleared here is
    the only one daisy runs again, and a cleared marker reads back 0."""
    processed = []

    def run(name: str) -> None:
        task = daisy.Task(name, total_roi=Roi((0, 0, 0), (40, 50, 70)), read_roi=Roi((0, 0, 0), (20, 30, 30)),
                          write_roi=Roi((5, 5, 5), (10, 20, 20)), process_function=lambda b: processed.append(tuple(b.write_roi.offset)),
                          read_write_conflict=False, fit="shrink", max_workers=1, tracking_path=str(tmp_path / "t"))
        daisy.run_blockwise([task], multiprocessing=False)

    run("t")
    assert len(processed) == 18
    markers = DoneMarkers(tmp_path / "t")
    done = markers.read()
    # row-major z, y, x cells; write offset = 5 + cell * (10, 20, 20)
    assert done.shape == (4, 3, 4) and done.sum() == 18 and done[:3, :2, :3].all()
    cells = np.zeros_like(done)
    cells[1, 0, 2] = True
    markers.clear(cells)
    assert DoneMarkers(tmp_path / "t").read().sum() == 17
    processed.clear()
    run("t")
    assert processed == [(15, 5, 45)]


@pytest.mark.parametrize("context", [(2, 3, 4), (12, 3, 25)])
def test_cells_are_daisys_blocks_whatever_the_context(tmp_path, context):
    """Cells.of names the blocks daisy marks done, also where the context is
    longer than the block (it once read z cell 1 as the first block: a
    mutex_3d run redid half its blocks on every re-run)."""
    layout = RunLayout(voxel_size=Coordinate(1, 1, 1), roi=Roi((0, 0, 0), (30, 40, 50)), offsets=(),
                       predict_output=Coordinate(1, 1, 1), predict_context=Coordinate(0, 0, 0),
                       block_shape=Coordinate(10, 20, 20), context=Coordinate(context), partition="waterz")
    processed = []
    task = daisy.Task("f", *step_geometry(layout, "fragments")[:3],
                      process_function=lambda b: processed.append(tuple(b.write_roi.offset)), read_write_conflict=False,
                      fit="shrink", max_workers=1, tracking_path=str(tmp_path / "t"))
    daisy.run_blockwise([task], multiprocessing=False)
    done = DoneMarkers(tmp_path / "t").read()
    cells = Cells.of(layout, "fragments", done.shape)
    np.testing.assert_array_equal(done, cells.real)
    named = {(int(cells.write_begin[0][z]), int(cells.write_begin[1][y]), int(cells.write_begin[2][x]))
             for z, y, x in np.argwhere(cells.real)}
    assert named == set(processed) and len(processed) == 3 * 2 * 3


def test_box_sums_equal_sums_of_slices():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, (5, 6, 7))
    lo = [rng.integers(-1, n, 4) for n in counts.shape]
    hi = [low + rng.integers(0, 4, 4) for low in lo]
    got = _box_sums(counts, lo, hi)
    for i, j, k in itertools.product(range(4), repeat=3):
        box = tuple(slice(max(0, l[x]), max(0, h[x])) for l, h, x in zip(lo, hi, (i, j, k)))
        assert got[i, j, k] == counts[box].sum()
