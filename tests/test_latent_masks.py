"""Latent single-instance masks (pipeline/methods/latent_masks.py): the
decoder's target masks against a crop of the labels, the sampled centres,
a training run and its predict-time outputs (affinities and uncertainty
through MaskAggr), the representations, and bad settings in one line."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from pipeline.methods import build_model, load_model, save_model
from pipeline.methods.latent_masks import Settings, dice_loss, level_margin, sample_centres, target_masks
from pipeline.training.loop import Training
from tests.conftest import assert_one_line_error, run_cli
from tests.test_training_loop import BACKBONE, OFFSETS_2D, nuclei_config

OFFSETS = [tuple(o) for o in OFFSETS_2D]


def settings(**changes) -> Settings:
    return Settings(**{"name": "latent_masks", "latent_dim": 8, "window": [1, 5, 5], "samples_per_level": 40,
                       "decoder_maps": 4, "foreground": {}, **changes})


def brute_force_targets(labels, annotated, centres, window, margin):
    """Per centre, the window crop of the labels: 1 where the centre's
    label, unless some voxel within `margin` (per axis) of the centre,
    inside the crop and annotated, has another label; valid where inside
    and annotated."""
    half = np.array(window) // 2
    reach = np.array(margin)
    shape = np.array(labels.shape[1:])
    targets, valid = [], []
    for b, *u in centres:
        own = labels[b, u[0], u[1], u[2]]
        boundary = False
        for d in itertools.product(*(range(-r, r + 1) for r in reach)):
            q = np.array(u) + d
            if (q >= 0).all() and (q < shape).all() and annotated[b, q[0], q[1], q[2]] and labels[b, q[0], q[1], q[2]] != own:
                boundary = True
        row_t, row_v = [], []
        for d in itertools.product(*(range(-h, h + 1) for h in half)):
            q = np.array(u) + d
            inside = (q >= 0).all() and (q < shape).all()
            row_v.append(bool(inside and annotated[b, q[0], q[1], q[2]]))
            row_t.append(float(inside and not boundary and labels[b, q[0], q[1], q[2]] == own))
        targets.append(row_t)
        valid.append(row_v)
    return np.array(targets), np.array(valid)


@pytest.mark.parametrize("window, margin", [((1, 5, 5), (0, 2, 2)), ((3, 5, 5), (1, 1, 1)), ((1, 3, 7), (0, 0, 0)),
                                            ((3, 5, 5), (1, 2, 1))])
def test_target_masks_are_a_crop_of_the_labels_with_the_boundary_rule(window, margin):
    rng = np.random.default_rng(0)
    # blocky labels (objects of 3 x 3 voxels and background), a tenth unannotated
    labels = np.kron(rng.integers(0, 4, (2, 3, 4, 4)), np.ones((1, 1, 3, 3), dtype=np.int64))[:, :, :11, :12]
    annotated = rng.random(labels.shape) > 0.1
    centres = np.array([(b, z, y, x) for b, z, y, x in np.ndindex(*labels.shape)
                        if labels[b, z, y, x] and annotated[b, z, y, x]])
    targets, valid = target_masks(torch.tensor(labels), torch.tensor(annotated), torch.tensor(centres), window, margin)
    expected_targets, expected_valid = brute_force_targets(labels, annotated, centres, window, margin)
    np.testing.assert_array_equal(targets.numpy(), expected_targets)
    np.testing.assert_array_equal(valid.numpy(), expected_valid)
    # both kinds occur: empty targets at boundaries, and full interiors
    empty = expected_targets.sum(1) == 0
    assert empty.any() and (~empty).any() if any(margin) else True


def test_the_boundary_margin_is_in_voxels_of_the_finest_level():
    assert level_margin(2, (1, 9, 9), (1, 1, 1)) == (0, 2, 2)
    assert level_margin(2, (1, 9, 9), (1, 2, 2)) == (0, 1, 1)
    assert level_margin(2, (1, 9, 9), (1, 4, 4)) == (0, 1, 1)
    assert level_margin(3, (5, 7, 7), (1, 2, 2)) == (3, 2, 2)
    assert level_margin(0, (5, 7, 7), (2, 2, 2)) == (0, 0, 0)


def test_sampled_centres_are_labelled_annotated_and_on_a_grid():
    labels = torch.zeros((2, 1, 60, 60), dtype=torch.int64)
    labels[:, :, 10:50, 5:40] = 3
    annotated = torch.ones_like(labels)
    annotated[1, :, :, 20:] = 0
    centres = sample_centres(labels, annotated, 120, torch.Generator().manual_seed(0))
    assert len(centres) > 10
    assert (labels[tuple(centres.T)] == 3).all() and (annotated[tuple(centres.T)] == 1).all()
    steps = {int(d) for d in torch.diff(centres[centres[:, 0] == 0][:, 3].unique())}
    assert steps == {8}  # sqrt(3600 / 60) rounded: a strided grid


def test_dice_loss_counts_empty_targets():
    prediction = torch.tensor([[0.5, 0.5], [0.5, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the second mask empty
    loss = dice_loss(prediction, target, torch.ones_like(target, dtype=torch.bool))
    loss.backward()
    assert prediction.grad[1, 0] > 0  # an empty target pulls its mask down
    assert loss.item() == pytest.approx(1 - 2 * 1.0 / (0.75 + 2.0))


def test_training_and_the_predict_outputs(tmp_path, nuclei):
    method = settings(affinity_heads=True).model_dump(mode="json")
    training = Training(nuclei_config(tmp_path, nuclei, method=method, iterations=3), "cpu")
    training.run(3)
    terms = training.history[-1]
    assert {"masks_0", "masks_1", "affinity", "foreground"} <= set(terms) and np.isfinite(terms["loss"])
    model = load_model(training.export())
    assert model.representations == ("maskaggr", "centre_mask", "affinities") and model.representation == "maskaggr"
    raw = torch.rand((1, 1, 1, 48, 48))
    offsets = OFFSETS + [(0, -4, 4)]  # any offset the windows reach, not only the training ones
    with torch.no_grad():
        outputs = model(raw)
        predicted = model.predict(outputs, offsets)
    assert set(predicted) == {"affs", "uncertainty"} and predicted["affs"].shape == (1, 5, 1, 32, 32)
    assert (predicted["uncertainty"] >= 0).all() and predicted["uncertainty"].max() > 0
    assert set(model.outputs(offsets)) == {"uncertainty", "foreground"} and model.outputs(offsets)["uncertainty"][0] == 5
    assert model.reach(offsets) == (0, 4, 4)  # a 5 x 5 window at 1/2
    # two voxels 4 apart fit a 5 x 5 window; 8 at 1/2
    assert model.offsets_error([(0, -8, 8)]) is None
    assert model.offsets_error([(0, -9, 0)]) is not None and model.offsets_error([(1, 0, 0)]) is not None
    model.representation = "centre_mask"
    with torch.no_grad():
        centre = model.predict(model(raw), [(0, -1, 0), (0, 2, -2)])
    assert set(centre) == {"affs"} and model.offsets_error([(0, -2, 2)]) is None
    assert model.offsets_error([(0, -3, 0)]) is not None  # from the centre of the finest 5 x 5 window


def test_bad_latent_mask_settings_are_one_line(tmp_path, nuclei):
    base = nuclei_config(tmp_path, nuclei, method=settings().model_dump(mode="json")).model_dump(mode="json")
    for method, message in (
        ({"name": "latent_masks", "window": [1, 4, 5]}, "odd sizes"),
        ({"name": "latent_masks", "window": [3, 5, 5]}, "a 2D network's masks are in-plane"),
        ({"name": "latent_masks", "levels": 4}, "method.levels: 4 levels, but the backbone has 2"),
        ({"name": "latent_masks", "latent_dim": 0}, "latent_dim"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**base, "method": method}))
        assert_one_line_error(run_cli("pipeline/train.py", str(path)), message)


def latent_run(tmp_path, nuclei, name: str = "run", **changes):
    """A latent-mask model with a foreground head, its masks and foreground
    spread (an untrained network's are all alike), segmenting two nuclei
    pages through the main job; (the run's config, the CLI's result)."""
    from funlib.persistence import open_ds

    from pipeline.config import RunConfig
    from tests.test_predict_invariant import _spread_masks

    method = settings()
    checkpoint = tmp_path / "latent.pt"
    torch.manual_seed(0)
    model = build_model(method, BACKBONE, OFFSETS).eval()  # the features the job's loaded model computes
    raw, _ = nuclei
    page = torch.from_numpy(open_ds(raw)[open_ds(raw).roi][50:51, :128, :128].astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        codes, features = model.codes(page)
        centred = -features.mean(dim=(0, 2, 3, 4))
        model.foreground.weight.data *= 20
        for head in (model.latent[0], model.foreground):
            head.bias.data = head.weight.data.flatten(1) @ centred
        # foreground where the (calibrated) probability is above its median: half of the page
        model.foreground.bias.data[1] -= torch.logit(model.foreground_outputs(features)["foreground"]).median()
        _spread_masks(model, model.latent[0](features))
    save_model(checkpoint, method, BACKBONE, OFFSETS, model.state_dict())
    config = RunConfig(**{"run_dir": str(tmp_path / name), "raw": raw, "roi": {"offset": [50, 0, 0], "shape": [2, 520, 696]},
                          "model": {"checkpoint": str(checkpoint)},
                          "predict": {"device": "cpu", "output_shape": [1, 128, 128]},
                          "mutex": {"biases": [0.0, 0.0, 1.0, 1.0], "merge_small": []},
                          "postprocess": {"block_shape": [1, 520, 696], "context": [0, 0, 0]}, **changes})
    path = tmp_path / f"{name}.json"
    path.write_text(config.model_dump_json())
    return config, run_cli("pipeline/predict.py", str(path))


def test_the_block_wise_job_writes_the_uncertainty(tmp_path, nuclei):
    """A latent-mask model segments nuclei pages through the main job: the
    affinities and their uncertainty (one channel per offset) from MaskAggr,
    and the run record holds the representation."""
    from funlib.persistence import open_ds

    from pipeline.orchestration.run_layout import RunDir

    _, result = latent_run(tmp_path, nuclei)
    assert result.returncode == 0, result.stderr
    uncertainty = open_ds(tmp_path / "run" / "volumes.zarr" / "uncertainty")
    assert uncertainty.shape == (len(OFFSETS), 2, 520, 696) and uncertainty.dtype == np.float16
    values = uncertainty[uncertainty.roi]
    assert np.isfinite(values).all() and (values >= 0).all() and values.max() > 0
    assert RunDir(tmp_path / "run").read_layout().representation == "maskaggr"
    segmentation = open_ds(tmp_path / "run" / "volumes.zarr" / "segmentation")[uncertainty.roi]
    assert segmentation.max() > 0
    # the proofreading list: sorted, most uncertain first, of segments that exist
    with open(tmp_path / "run" / "proofreading" / "segments.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["uncertainty"]) for r in rows]
    assert len(rows) > 10 and values == sorted(values, reverse=True) and values[0] > 0
    present = set(np.unique(segmentation).tolist()) - {0}
    assert {int(r["segment"]) for r in rows} == present
    assert sum(int(r["voxels"]) for r in rows) == int((segmentation > 0).sum())
    with open(tmp_path / "run" / "proofreading" / "edges.csv") as f:
        edges = list(csv.DictReader(f))
    assert edges and all(int(e["segment_a"]) in present and int(e["segment_b"]) in present for e in edges)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["proofreading"]["segments"][0]["segment"] == int(rows[0]["segment"])


def test_a_run_partitions_given_predictions_with_their_foreground_and_uncertainty(tmp_path, nuclei):
    """An earlier run's affinities, foreground and uncertainty given to a
    new run (AffinitiesConfig.outputs): the same segmentation and the same
    proofreading list, without a model; and the run record names them, so
    one changed is another run."""
    from funlib.persistence import open_ds

    first, result = latent_run(tmp_path, nuclei)
    assert result.returncode == 0, result.stderr
    volumes = tmp_path / "run" / "volumes.zarr"
    foreground = open_ds(volumes / "foreground")[open_ds(volumes / "foreground").roi]
    assert 0.2 < (foreground >= 128).mean() < 0.8  # the foreground decides something
    given = {"model": None, "affinities": {"dataset": str(volumes / "affs"), "offsets": [list(o) for o in OFFSETS],
                                           "outputs": {"foreground": str(volumes / "foreground"),
                                                       "uncertainty": str(volumes / "uncertainty")}}}
    config = first.model_copy(update={"run_dir": str(tmp_path / "given"), "model": None}).model_dump(mode="json")
    path = tmp_path / "given.json"
    path.write_text(json.dumps({**config, **given}))
    result = run_cli("pipeline/predict.py", str(path))
    assert result.returncode == 0, result.stderr
    segmentations = [open_ds(tmp_path / name / "volumes.zarr" / "segmentation") for name in ("run", "given")]
    assert (segmentations[0][segmentations[0].roi] == segmentations[1][segmentations[1].roi]).all()
    for table in ("segments.csv", "edges.csv"):
        assert (tmp_path / "given" / "proofreading" / table).read_text() == (tmp_path / "run" / "proofreading" / table).read_text()
    assert not (tmp_path / "given" / "volumes.zarr" / "uncertainty").exists()  # read where it is, not copied
    # the given uncertainty changed: the run record refuses the old directory
    data = open_ds(volumes / "uncertainty", mode="r+")
    data[data.roi] = np.zeros(data.shape, dtype=np.float16)
    assert_one_line_error(run_cli("pipeline/predict.py", str(path)), "uncertainty")
    # a given output of the wrong form is a one-line error before any work
    wrong = {**given["affinities"], "outputs": {"uncertainty": str(volumes / "foreground")}}
    path.write_text(json.dumps({**config, "run_dir": str(tmp_path / "wrong"), "model": None, "affinities": wrong}))
    assert_one_line_error(run_cli("pipeline/predict.py", str(path)), "affinities.outputs.uncertainty")


def test_decoding_in_cache_sized_calls_gives_every_voxel_its_own_mask(monkeypatch):
    """`Model.decode` splits the codes into calls of a few hundred; the
    masks are those of one call over all codes, in voxel order."""
    from pipeline.methods import latent_masks

    torch.manual_seed(0)
    model = build_model(settings(foreground=None), BACKBONE, OFFSETS).eval()
    codes = torch.randn((2, 8, 1, 9, 11))
    monkeypatch.setattr(latent_masks, "DECODE_CACHE_FLOATS", 7 * model.decoder.maps * 25)  # calls of 7 codes
    with torch.no_grad():
        masks = model.decode(codes)
        whole = model.decoder(codes.movedim(1, -1).reshape(-1, 8))
    assert masks.shape == (2, 25, 1, 9, 11)
    assert torch.equal(masks[1, :, 0, 4, 6], whole[(1 * 9 + 4) * 11 + 6])
    assert torch.allclose(masks.movedim(1, -1).reshape(-1, 25), whole, atol=1e-6)
