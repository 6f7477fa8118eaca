"""The embedding method (PEA) against brute-force definitions: cosine and
cross affinities, CCM's inverse transform, EPM's targets, adaptive offsets
at predict time; and model files that record their method."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.methods import affinity, build_model, embedding, load_model, save_model
from pipeline.methods.base import Progress, TrainingBatch, label_affinities
from pipeline.methods.embedding import SecondView, cosine_affinities, cross_affinities, level_offsets, nearest_downsample

RESIDUAL_2D = {"name": "residual_unet", "dims": 2, "widths": [4, 6, 8], "downsample_factors": [[1, 2, 2], [1, 2, 2]], "crop": [0, 4, 4]}
OFFSETS_2D = [(0, -1, 0), (0, 0, -1), (0, -3, 0), (0, 0, -3)]


def brute_force_pairs(values: np.ndarray, other: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray]:
    """sum_d values[d, i] * other[d, i + o] voxel by voxel, and whether i + o is inside."""
    out = np.zeros(values.shape[1:], dtype=np.float64)
    inside = np.zeros(values.shape[1:], dtype=bool)
    for i in itertools.product(*(range(s) for s in values.shape[1:])):
        j = tuple(a + b for a, b in zip(i, offset))
        if all(0 <= x < s for x, s in zip(j, values.shape[1:])):
            out[i] = float(np.dot(values[(slice(None), *i)], other[(slice(None), *j)]))
            inside[i] = True
    return out, inside


def unit_embedding(shape, seed: int) -> torch.Tensor:
    e = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return e / e.norm(dim=1, keepdim=True)


# offsets in every direction, longer than the volume too
OFFSETS = [(-1, 0, 0), (0, 2, -1), (3, -2, 4), (0, 0, 7), (-4, 1, 1)]


def test_cosine_affinities_equal_brute_force_for_any_offset():
    e = unit_embedding((2, 5, 4, 6, 7), 0)
    cos, inside = cosine_affinities(e, OFFSETS)
    for b, (c, offset) in itertools.product(range(2), enumerate(OFFSETS)):
        expected, expected_inside = brute_force_pairs(e[b].numpy(), e[b].numpy(), offset)
        np.testing.assert_allclose(cos[b, c].numpy(), expected, atol=1e-6)
        np.testing.assert_array_equal(inside[b, c].numpy(), expected_inside)
    assert (cos.abs() > 0.1).any()


def test_cross_affinities_pair_the_first_view_with_the_second():
    e, other = unit_embedding((1, 3, 4, 5, 6), 1), unit_embedding((1, 3, 4, 5, 6), 2)
    cross, _ = cross_affinities(e, other, OFFSETS)
    for c, offset in enumerate(OFFSETS):
        expected, _ = brute_force_pairs(e[0].numpy(), other[0].numpy(), offset)
        np.testing.assert_allclose(cross[0, c].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("planar", [True, False])
def test_the_second_view_maps_back_to_the_original_orientation(planar):
    settings = embedding.CCMSettings()
    x = torch.rand(1, 3, 4 if not planar else 1, 12, 12)
    transforms = set()
    for seed in range(16):
        view = SecondView.draw(x.shape, settings, planar, torch.Generator().manual_seed(seed))
        assert torch.equal(view.undo(view.spatial(x)), x)
        transforms.add((view.flips, view.transpose))
        if planar:
            assert 2 not in view.flips  # sections are never reordered
    assert len(transforms) > 4  # the draws vary: the round trip is not trivially an identity


def test_the_second_view_changes_intensity_and_cuts_out_boxes():
    settings = embedding.CCMSettings(max_cutouts=5, cutout_size=((1, 2), (2, 3), (2, 3)))
    raw = torch.full((1, 1, 1, 16, 16), 0.5)
    view = SecondView.draw(raw.shape, settings, True, torch.Generator().manual_seed(3))
    assert view.cutouts
    changed = view.apply(raw)
    assert (changed == 0).sum() > 0
    assert torch.allclose(changed[changed != 0], torch.tensor(0.5 * view.contrast + view.brightness))


def test_epm_targets_equal_affinities_of_downsampled_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(2, 4, 16, 12))
    mask = rng.random(labels.shape) < 0.8
    factor = (2, 4, 2)
    small = nearest_downsample(torch.as_tensor(labels), factor).numpy()
    small_mask = nearest_downsample(torch.as_tensor(mask), factor).numpy()
    # nearest: the voxel at each cell's centre (rounded up)
    assert small.shape == (2, 2, 4, 6)
    for b, z, y, x in itertools.product(*(range(s) for s in small.shape)):
        assert small[b, z, y, x] == labels[b, 2 * z + 1, 4 * y + 2, 2 * x + 1]
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -2), (0, 1, 1)]
    target, valid = label_affinities(torch.as_tensor(small), torch.as_tensor(small_mask), offsets)
    for b, (c, offset) in itertools.product(range(2), enumerate(offsets)):
        for i in itertools.product(*(range(s) for s in small.shape[1:])):
            j = tuple(a + o for a, o in zip(i, offset))
            inside = all(0 <= v < s for v, s in zip(j, small.shape[1:]))
            same = inside and small[b][i] == small[b][j] and small[b][i] != 0
            annotated = inside and (small_mask[b][i] or small_mask[b][j])
            assert target[b, c][i] == float(same)
            assert valid[b, c][i] == annotated


def test_levels_use_the_short_training_offsets_or_the_nearest_neighbours():
    offsets = [(0, -1, 0), (0, 0, -1), (0, -3, 0), (0, 0, -9)]
    assert level_offsets(offsets, 3) == [(0, -1, 0), (0, 0, -1), (0, -3, 0)]
    assert level_offsets([(0, -3, 0), (0, 0, -3)], 1) == [(0, -1, 0), (0, 0, -1)]


def test_pyramid_levels_line_up_with_the_output():
    settings = embedding.Settings(name="embedding", dim=4, epm={"ranges": [3, 1]})
    model = build_model(settings, RESIDUAL_2D, OFFSETS_2D).eval()
    with torch.no_grad():
        out, pyramid, _ = model.embeddings(torch.rand(1, 1, 2, 40, 40), levels=True)
    assert out.shape == (1, 4, 2, 32, 32)
    assert [tuple(p.shape) for p in pyramid] == [(1, 4, 2, 16, 16), (1, 4, 2, 8, 8)]
    assert torch.allclose(out.norm(dim=1), torch.ones(()))


def _toy_batch():
    labels = torch.zeros(1, 1, 32, 32, dtype=torch.int64)
    labels[:, :, 4:20, 4:20] = 1
    labels[:, :, 20:30, 8:28] = 2
    raw = (labels > 0).float()[:, None] * 0.8 + 0.1
    annotated = torch.ones_like(labels, dtype=torch.uint8)
    target, valid = label_affinities(labels, annotated, OFFSETS_2D)
    return TrainingBatch(raw, labels, annotated, target, valid.float())


def _loss(step, batch) -> torch.Tensor:
    """The loss the training loop optimises: the sum of the step's terms."""
    return torch.stack(list(step(batch, Progress(0, 1)).losses.values())).sum()


FULL = embedding.Settings(name="embedding", dim=4, epm={"ranges": [3, 1]}, foreground={})
SCM_ONLY = FULL.model_copy(update={"ccm": None, "epm": None, "foreground": None})


def _step(settings):
    torch.manual_seed(0)  # the backbone and embedding head are built first: the same for every setting
    model = build_model(settings, {**RESIDUAL_2D, "crop": [0, 0, 0]}, OFFSETS_2D)
    return embedding.TrainingStep(model, settings)


@pytest.mark.parametrize("term", ["ccm", "epm", "foreground"])
def test_each_term_adds_to_the_loss(term):
    batch = _toy_batch()
    with torch.no_grad():
        scm = float(_loss(_step(SCM_ONLY), batch))
        more = _step(SCM_ONLY.model_copy(update={term: getattr(FULL, term)}))(batch, Progress(0, 1)).losses
    assert float(torch.stack(list(more.values())).sum()) > scm + 1e-4
    assert {"scm", *([term] if term != "epm" else ["epm_1", "epm_2"])} == set(more)


@pytest.mark.parametrize("background_pairs", [True, False])
def test_background_pairs_can_be_left_to_the_foreground_head(background_pairs):
    """With background_pairs false, a voxel whose every pair touches
    background gets no gradient from the embedding terms."""
    settings = SCM_ONLY.model_copy(update={"foreground": FULL.foreground, "background_pairs": background_pairs})
    step = _step(settings)
    gradient = {}

    def keep_gradient(module, inputs, output) -> None:
        output.register_hook(lambda g: gradient.setdefault("embedding", g))

    step.model.embed.register_forward_hook(keep_gradient)
    _loss(step, _toy_batch()).backward()
    # rows 0..1, columns 28..31: more than the longest offset (3) from both objects
    far = gradient["embedding"][0, :, 0, 0:2, 28:32].abs().max()
    inside = gradient["embedding"][0, :, 0, 8:12, 8:12].abs().max()
    assert inside > 0
    assert (far > 0) if background_pairs else (far == 0)


def test_the_training_step_learns():
    batch = _toy_batch()
    step = _step(FULL)
    optimiser = torch.optim.Adam(step.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        optimiser.zero_grad()
        output = step(batch, Progress(0, 30))
        loss = torch.stack(list(output.losses.values())).sum()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    prediction = output.snapshot["prediction"]
    assert prediction.shape == batch.affs.shape and prediction.min() >= 0
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize("weights, expected", [((1.0, 10.0), 1 / 11), ((1.0, 1.0), 0.5)])
def test_the_foreground_probability_undoes_the_class_weights(weights, expected):
    """Equal logits mean 'as likely as not' only without class weights; the
    weighted cross-entropy's optimum shifts the logits by log(w_fg / w_bg)."""
    settings = embedding.Settings(name="embedding", dim=4, ccm=None, epm=None, foreground={"class_weights": weights})
    model = build_model(settings, RESIDUAL_2D, OFFSETS_2D).eval()
    torch.nn.init.zeros_(model.foreground.weight)
    torch.nn.init.zeros_(model.foreground.bias)
    with torch.no_grad():
        probability = model(torch.rand(1, 1, 1, 40, 40))["foreground"]
    assert torch.allclose(probability, torch.tensor(expected))


def test_model_files_record_their_method(tmp_path):
    settings = embedding.Settings(name="embedding", dim=5, ccm=None, epm=None)
    model = build_model(settings, RESIDUAL_2D, OFFSETS_2D)
    save_model(tmp_path / "m.pt", settings, RESIDUAL_2D, OFFSETS_2D, model.state_dict())
    loaded = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, embedding.Model) and loaded.method == settings and loaded.offsets == tuple(OFFSETS_2D)
    raw = torch.rand(1, 1, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(raw)["embedding"], model.eval()(raw)["embedding"])
    # adaptive offsets: any in-plane offset; an affinity model refuses others
    assert loaded.offsets_error([(0, -7, 2)]) is None
    plain = build_model(affinity.Settings(), RESIDUAL_2D, OFFSETS_2D)
    assert "training offsets" in plain.offsets_error([(0, -7, 2)])


def test_a_model_file_from_before_methods_still_loads(tmp_path):
    """The bundled model is such a file (format 1: the head inside the
    backbone); it loads as the affinity method with the same weights."""
    from tests.conftest import MODEL

    old = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert old["format"] == "affseg-model-1"
    model = load_model(MODEL)
    assert isinstance(model, affinity.Model)
    assert torch.equal(model.head.weight, old["state_dict"]["head.weight"])
    assert torch.equal(model.backbone.down[0][0].weight, old["state_dict"]["down.0.0.weight"])
