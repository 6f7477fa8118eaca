"""2D path: mutex watershed per section, small-segment merging, and the
main job run with a 2D model on the ISBI 2012 sections."""

from __future__ import annotations

import json

import numpy as np
from funlib.persistence import open_ds

from pipeline.evaluation.metrics import Contingency, scores
from pipeline.kernels.mutex import clean_foreground, merge_small_segments, mutex_watershed
from tests.conftest import REPO, noisy_ground_truth_affinities, run_cli, save_affinity_model

OFFSETS_2D = [[0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3], [0, -9, 0], [0, 0, -9]]
# the bundled PEA nuclei model on test pages 50 and 51, with this test's offsets, gives AJI 0.871 at the
# config's bias 0.5 with mirrored borders (README: all ten test pages); the
# bound catches a broken pipeline (foreground, offsets, ids, borders), not
# small changes of the model's quality
MIN_NUCLEI_AJI = 0.7


def test_mutex_watershed_recovers_the_instances_of_a_real_section(isbi):
    labels = open_ds(isbi[1])
    truth = labels[labels.roi][3]
    offsets = [o[1:] for o in OFFSETS_2D]
    affs = noisy_ground_truth_affinities(truth, offsets, noise=0.2)
    segmentation = mutex_watershed(affs, offsets, [0.5] * len(offsets))
    table = Contingency()
    table.add(segmentation, truth)  # ground truth 0 (membrane) is ignored
    assert scores(table)["arand"] < 0.02
    assert len(np.unique(segmentation)) >= len(np.unique(truth)) - 1


def test_with_a_foreground_only_the_foreground_is_partitioned():
    truth = np.zeros((40, 40), dtype=np.int64)
    truth[5:15, 5:15] = 1
    truth[5:15, 18:30] = 2  # 3 pixels of background from object 1
    truth[25:35, 10:20] = 3
    offsets = [(-1, 0), (0, -1), (-3, 0), (0, -3)]
    # affinities that say "all one object", background included; no offset
    # jumps the background between objects 1 and 2 (3 pixels)
    affs = np.full((len(offsets), *truth.shape), 255, dtype=np.uint8)
    foreground = truth > 0
    labels = mutex_watershed(affs, offsets, [0.5] * len(offsets), foreground=foreground)
    assert (labels[~foreground] == 0).all() and (labels[foreground] > 0).all()
    # no segment grows through the background: the three objects stay apart
    assert len({labels[10, 10], labels[10, 20], labels[30, 15]}) == 3
    assert len(np.unique(mutex_watershed(affs, offsets, [0.5] * len(offsets)))) == 1  # without it, one segment


def test_foreground_specks_are_dropped():
    probability = np.zeros((30, 30))
    probability[2:12, 2:12] = 0.9
    probability[20:22, 20:22] = 0.8  # 4 pixels
    foreground = clean_foreground(probability, 0.5, 5)
    assert foreground.sum() == 100 and not foreground[20:22, 20:22].any()


def test_small_segments_join_their_most_frequent_neighbour():
    labels = np.ones((30, 30), dtype=np.uint64)
    labels[:, 20:] = 2
    labels[5:7, 5:7] = 3  # 4 pixels inside 1
    labels[10:12, 19:21] = 4  # 4 pixels across the border of 1 and 2
    labels[20:26, 2:8] = 5  # 36 pixels: large enough to stay
    merged = merge_small_segments(labels, [(5, 3)])
    assert len(np.unique(merged)) == 3
    assert merged[5, 5] == merged[0, 0]
    assert merged[20, 2] != merged[0, 0]
    np.testing.assert_array_equal(merged[labels == 5], merged[20, 2])


def test_main_job_with_a_2d_model_segments_each_section(tmp_path, isbi):
    raw, labels = isbi
    spec = {"name": "residual_unet", "dims": 2, "widths": [4, 6, 8], "downsample_factors": [[1, 2, 2], [1, 2, 2]], "crop": [0, 4, 4]}
    save_affinity_model(tmp_path / "model2d.pt", spec, OFFSETS_2D)
    config = {
        "run_dir": str(tmp_path / "run"),
        "raw": raw,
        "ground_truth": labels,
        "roi": {"offset": [0, 0, 0], "shape": [200, 1024, 1024]},  # 4 sections, 256 x 256
        "model": {"checkpoint": str(tmp_path / "model2d.pt")},
        "predict": {"device": "cpu", "output_shape": [2, 128, 128]},
        "postprocess": {"block_shape": [100, 1024, 1024], "context": [50, 4, 4], "workers": 2},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run_cli("pipeline/predict.py", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"]["mutex"]["completed"] == 2
    assert [row["threshold"] for row in report["scores"]] == [0.5]
    segmentation = open_ds(str(tmp_path / "run" / "volumes.zarr" / "segmentation"))
    data = segmentation[segmentation.roi]
    assert data.min() > 0  # mutex watershed labels every pixel
    sections = [set(np.unique(s).tolist()) for s in data]
    assert all(not a & b for i, a in enumerate(sections) for b in sections[i + 1:])  # ids unique per section
    status = run_cli("pipeline/status.py", str(path))
    assert status.returncode == 0 and "mutex" in status.stdout and "fragments" not in status.stdout
    # wider blocks than the ROI's sections are refused with one line
    config["postprocess"]["block_shape"] = [100, 512, 1024]
    config["run_dir"] = str(tmp_path / "run2")
    path.write_text(json.dumps(config))
    refused = run_cli("pipeline/predict.py", str(path))
    assert refused.returncode == 2 and "segmented whole" in refused.stderr


def test_the_bundled_pea_model_segments_nuclei_inside_the_foreground(tmp_path, nuclei):
    """Two test pages through the main job: an embedding model with a
    foreground head, adaptive offsets, no context, 2D instance scores."""
    raw, labels = nuclei
    config = json.loads((REPO / "configs/nuclei_pea.json").read_text())
    config.update(
        run_dir=str(tmp_path / "run"), raw=raw, ground_truth=labels,
        roi={"offset": [50, 0, 0], "shape": [2, 520, 696]},
        model={"checkpoint": str(REPO / "models/nuclei_pea.pt"),
               # the training offsets and two it never saw
               "offsets": [[0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3], [0, -5, 0], [0, 0, -5], [0, -9, 0],
                           [0, 0, -9], [0, -11, 0], [0, 0, -11], [0, -7, 7], [0, -15, 0]]},
    )
    config["postprocess"] = {"block_shape": [1, 520, 696], "context": [0, 0, 0], "workers": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run_cli("pipeline/predict.py", str(path))
    assert result.returncode == 0, result.stderr
    assert "aji" in result.stdout and "pq" in result.stdout
    row = json.loads((tmp_path / "run" / "report.json").read_text())["scores"][0]
    assert row["aji"] > MIN_NUCLEI_AJI and row["dice"] > 0.85, row
    volumes = tmp_path / "run" / "volumes.zarr"
    segmentation = open_ds(str(volumes / "segmentation"))
    foreground = open_ds(str(volumes / "foreground"))
    data, probability = segmentation[segmentation.roi], foreground[foreground.roi][0]
    assert (data[probability < 128] == 0).all()  # background stays background
    assert (data > 0).mean() > 0.05
