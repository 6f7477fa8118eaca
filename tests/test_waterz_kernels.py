"""Our compiled port of waterz (pipeline/kernels/compiled/waterz.py) against
waterz 0.10.1 itself, the slow reference: the same basins, the same
fragments after epsilon merging and the same merge history, decision for
decision, for each scoring function the config offers.

Inputs: affinities the bundled model predicts on the sample (the real
case), noisy affinities of real ground-truth bodies, and coarse random
affinities with many ties and plateaus (which decide the queue's order
and the watershed's plateau division)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import waterz
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds

from pipeline.config import load_json
from pipeline.kernels.watershed import QUANTILES, epsilon_agglomerate, merge_history, relabel_consecutive
from pipeline.methods import load_model
from pipeline.storage.volumes import as_uint8
from tests.conftest import RAW, REPO, noisy_ground_truth_affinities

# the C++ types of the scoring functions, as waterz names them
WATERZ_SCORING = {
    "hist_quant_50": "OneMinus<HistogramQuantileAffinity<RegionGraphType,50,ScoreValue,256,false>>",
    "hist_quant_75": "OneMinus<HistogramQuantileAffinity<RegionGraphType,75,ScoreValue,256,false>>",
    "mean": "OneMinus<MeanAffinity<RegionGraphType,ScoreValue>>",
}


def waterz_agglomerate(affs: np.ndarray, threshold: float, scoring: str, fragments=None):
    """waterz on uint8 affinities as float32 / 255: (segmentation, merge
    history as rows (a, b, score))."""
    segmentation, history = next(waterz.agglomerate(
        np.ascontiguousarray(affs[:3]).astype(np.float32) / 255.0, [threshold],
        fragments=None if fragments is None else np.ascontiguousarray(fragments, dtype=np.uint64).copy(),
        scoring_function=WATERZ_SCORING[scoring], discretize_queue=256, return_merge_history=True,
    ))
    rows = np.array([(m["a"], m["b"], m["score"]) for m in history], dtype=np.float64).reshape(-1, 3)
    assert all(m["c"] == m["a"] for m in history)
    return segmentation.copy(), rows


@pytest.fixture(scope="module")
def predicted() -> np.ndarray:
    """The bundled model's nearest-neighbour affinities on a 40 x 96 x 96 crop
    of the sample, uint8."""
    model = load_model(REPO / "models/fib25_mala.pt")
    out = model.geometry.valid_output_shape((40, 96, 96))
    raw = open_ds(RAW)
    shape = Coordinate(model.geometry.input_shape(out)) * raw.voxel_size
    data = raw[Roi(raw.roi.begin + raw.voxel_size * 20, shape)]
    with torch.inference_mode():
        outputs = model(torch.from_numpy(data.astype(np.float32) / 255.0)[None, None])
        affs = model.affinities(outputs, model.offsets[:3])[0].numpy()
    return as_uint8(affs)


@pytest.fixture(scope="module")
def noisy(labels) -> np.ndarray:
    truth = open_ds(labels)[Roi((1200, 600, 600), (300, 640, 640))]
    offsets = [tuple(o) for o in load_json(REPO / "configs/train_fib25.json")["offsets"]][:3]
    return noisy_ground_truth_affinities(truth, offsets, 0.3)


def coarse_random() -> np.ndarray:
    # six levels, 0 and 255 included: plateaus, ties, and voxels with no
    # affinity above waterz's low threshold (background)
    rng = np.random.default_rng(4)
    return rng.choice(np.array([0, 64, 128, 200, 235, 255], np.uint8), size=(3, 14, 21, 23))


INPUTS = ("predicted", "noisy", "coarse")


def affinities(name: str, request) -> np.ndarray:
    return coarse_random() if name == "coarse" else request.getfixturevalue(name)


@pytest.mark.parametrize("scoring", list(QUANTILES))
@pytest.mark.parametrize("name", INPUTS)
def test_fragments_equal_waterz(name, scoring, request):
    """The watershed (epsilon 0: basins only) and epsilon merging on top."""
    affs = affinities(name, request)
    counts = []
    # the last epsilon is a score a histogram can have (bin 128's): merging
    # stops at scores >= epsilon, not only above
    for epsilon in (0.0, 0.1, 0.3, 1 - 128.5 / 256):
        expected, _ = waterz_agglomerate(affs, epsilon, scoring)
        ours = epsilon_agglomerate(affs, None, epsilon, scoring)
        assert ours.dtype == np.uint64
        np.testing.assert_array_equal(ours, expected)
        counts.append(len(np.unique(expected)))
    # basins, then fewer fragments at each epsilon
    assert counts[0] > counts[1] > counts[2] > 10


@pytest.mark.parametrize("scoring", list(QUANTILES))
@pytest.mark.parametrize("name", INPUTS)
def test_merge_history_equals_waterz(name, scoring, request):
    """Agglomeration of given fragments: every merge, in order, with its
    score; and epsilon merging of given fragments (the distance method)."""
    affs = affinities(name, request)
    fragments, _ = relabel_consecutive(epsilon_agglomerate(affs, None, 0.0, scoring))
    _, expected = waterz_agglomerate(affs, 1.0, scoring, fragments)
    uv, history = merge_history(affs, fragments, scoring)
    assert len(expected) > 10
    np.testing.assert_array_equal(history, expected)
    # the graph: every pair of face-adjacent fragments, in (u, v) order
    pairs = set()
    for axis in range(3):
        a = np.moveaxis(fragments, axis, 0)
        here, there = a[1:].ravel(), a[:-1].ravel()
        keep = (here != there) & (here > 0) & (there > 0)
        pairs |= set(zip(np.minimum(here, there)[keep].tolist(), np.maximum(here, there)[keep].tolist()))
    assert [tuple(e) for e in uv.tolist()] == sorted(pairs)
    merged, _ = waterz_agglomerate(affs, 0.2, scoring, fragments)
    np.testing.assert_array_equal(epsilon_agglomerate(affs, fragments, 0.2, scoring), merged)


def test_edge_table_against_a_dict():
    """The region merging's edge table (open addressing, deletion by
    shifting back) against a dict, in a table small enough that clusters
    wrap around its end."""
    from pipeline.kernels.compiled.waterz import _find_edge, _insert_edge, _remove_edge

    bits = 5
    mask, shift = (1 << bits) - 1, np.uint64(64 - bits)
    keys, table = np.full(1 << bits, -1, np.int64), np.empty(1 << bits, np.int32)
    rng = np.random.default_rng(5)
    expected: dict[int, int] = {}
    for step in range(20000):
        key = int(rng.integers(0, 64))
        if key in expected and rng.random() < 0.5:
            _remove_edge(keys, table, key, shift, mask)
            del expected[key]
        elif key not in expected and len(expected) < 24:
            _insert_edge(keys, table, key, step, shift, mask)
            expected[key] = step
        for probe in rng.integers(0, 64, 4).tolist():
            assert _find_edge(keys, table, probe, shift, mask) == expected.get(probe, -1)
    assert (keys >= 0).sum() == len(expected)


def test_a_region_bordering_hundreds_equals_waterz():
    """One region around 361 small ones: its neighbours are sorted by the
    library sort, not the insertion sort of short lists."""
    rng = np.random.default_rng(6)
    fragments = np.ones((4, 40, 40), np.uint64)
    # ids in no spatial order, so that they are met unsorted
    fragments[1:3, 1:39:2, 1:39:2] = rng.permutation(np.arange(2, 2 + 19 * 19)).reshape(19, 19)
    affs = rng.integers(0, 256, (3, 4, 40, 40)).astype(np.uint8)
    _, expected = waterz_agglomerate(affs, 1.0, "hist_quant_50", fragments)
    uv, history = merge_history(affs, fragments, "hist_quant_50")
    assert (uv[:, 0] == 1).sum() == 361
    np.testing.assert_array_equal(history, expected)
