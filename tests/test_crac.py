"""CRAC (pipeline/methods/crac.py): the supervised region, the entropy
filter and its schedule, no leak of unannotated ground truth, the teacher
switches (detached or not, EMA), exact resume with an EMA teacher, the
representation a run chooses, and bad settings in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.methods import build_model, load_model, save_model, training_step
from pipeline.methods.base import Progress, TrainingBatch, label_affinities
from pipeline.methods.crac import Settings, alpha_at, binary_entropy, confident, instance_pairs, pair_regions
from pipeline.orchestration.run_layout import RunDir, RunLayout, check_run_dir, claim_run_dir, run_record
from pipeline.errors import UserError
from pipeline.training.loop import Training
from tests.conftest import assert_one_line_error, run_cli
from tests.test_training_loop import BACKBONE, OFFSETS_2D, nuclei_config

OFFSETS = [tuple(o) for o in OFFSETS_2D]


def settings(**changes) -> Settings:
    return Settings(**{"name": "crac", "dim": 4, "entropy": {"horizon": 100, "alpha": 0.1}, "foreground": {}, **changes})


def test_the_supervised_region_is_every_pair_the_annotation_determines():
    # one row of voxels x0..x5: x1 and x2 an annotated instance (id 5), x3
    # known background, x4 carries a label but lies outside the annotation
    # (an unannotated instance: its label must not matter), x0 and x5 unknown
    labels = torch.tensor([0, 5, 5, 0, 7, 0]).view(1, 1, 1, 6)
    annotated = torch.tensor([0, 1, 1, 1, 0, 0]).view(1, 1, 1, 6)
    supervised, unlabelled = pair_regions(annotated, [(0, 0, -1), (0, 0, -2)])
    # pair i is (x_i, x_{i+o}); offset -1: i = 1..5, offset -2: i = 2..5.
    # The instance's pairs and its boundary pairs, and those of the known
    # background x3 with the unknown x4 and x5 (they are different objects)
    expected_supervised = [[False, True, True, True, True, False], [False, False, True, True, True, True]]
    expected_unlabelled = [[False, False, False, False, False, True], [False, False, False, False, False, False]]
    assert supervised[0, :, 0, 0].tolist() == expected_supervised
    assert unlabelled[0, :, 0, 0].tolist() == expected_unlabelled
    # without known background (EM: x3 unknown too), the notes' M: pairs
    # starting inside the annotated instance, and its boundary pairs
    supervised, _ = pair_regions(torch.tensor([0, 1, 1, 0, 0, 0]).view(1, 1, 1, 6), [(0, 0, -1), (0, 0, -2)])
    assert supervised[0, :, 0, 0].tolist() == [[False, True, True, True, False, False], [False, False, True, True, True, False]]
    # E's without background pairs: those touching the known background x3
    # go, and those with no voxel in the instance
    implicit = instance_pairs(labels, annotated, [(0, 0, -1), (0, 0, -2)])
    assert implicit[0, :, 0, 0].tolist() == [[False, True, True, False, False, False], [False, False, True, False, True, False]]


def test_the_entropy_filter_drops_exactly_the_alpha_fraction_most_uncertain():
    generator = torch.Generator().manual_seed(0)
    p = torch.rand((2, 4, 1, 30, 30), generator=generator)
    candidates = torch.rand((2, 4, 1, 30, 30), generator=generator) < 0.6
    for alpha in (0.005, 0.1, 0.37):
        kept = confident(p, candidates, alpha)
        dropped = candidates & ~kept
        assert not (kept & ~candidates).any()
        assert int(dropped.sum()) == int(alpha * int(candidates.sum())) > 0
        assert binary_entropy(p[dropped]).min() >= binary_entropy(p[kept]).max()
    assert torch.equal(confident(p, candidates, 0.0), candidates)


def test_alpha_follows_its_schedule():
    entropy = settings().entropy
    assert alpha_at(entropy, 0) == pytest.approx(0.1)
    assert alpha_at(entropy, 50) == pytest.approx(0.1 * 0.5 ** 1.5)
    assert alpha_at(entropy, 100) == 0 and alpha_at(entropy, 1000) == 0


def _batch(labels: np.ndarray, annotated: np.ndarray, raw: torch.Tensor) -> TrainingBatch:
    labels, annotated = torch.as_tensor(labels), torch.as_tensor(annotated)
    # targets as a pipeline without an annotation mask would make them, from
    # every label: the step must not read them
    affs, affs_mask = label_affinities(labels, torch.ones_like(annotated), OFFSETS)
    return TrainingBatch(raw, labels, annotated.float(), affs, affs_mask.float())


def _instances(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Square instances on a background, a third of them annotated."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((1, 1, 48, 48), dtype=np.int64)
    for i in range(1, 13):
        y, x = rng.integers(0, 40, size=2)
        labels[0, 0, y:y + 8, x:x + 8] = i
    annotated = (labels == 0) | (labels % 3 == 0)
    return labels, annotated.astype(np.int64)


def test_unannotated_instances_do_not_reach_the_supervised_loss():
    torch.manual_seed(0)
    model = build_model(settings(), BACKBONE, OFFSETS)
    step = training_step(model, model.method).eval()
    raw = torch.rand((1, 1, 1, 64, 64), generator=torch.Generator().manual_seed(1))
    labels, annotated = _instances(0)
    outside = annotated == 0
    relabelled = labels.copy()
    relabelled[outside] = 3  # the unannotated instances become an annotated one's id
    deleted = np.where(outside, 0, labels)

    def supervised(labels):
        with torch.no_grad():
            losses = step(_batch(labels, annotated, raw), Progress(0, 10)).losses
        return losses["supervised_implicit"].item(), losses["supervised_explicit"].item()

    assert supervised(labels) == supervised(relabelled) == supervised(deleted)
    # an annotated instance's labels do count: split one, and the loss
    # changes (the comparison can fail)
    changed = labels.copy()
    rows = np.arange(48).reshape(1, 1, 48, 1)
    changed[(labels == 3) & (rows % 2 == 0)] = 99
    assert supervised(changed) != supervised(labels)


def test_background_pairs_switch_changes_the_embeddings_supervision_only():
    labels, annotated = _instances(2)
    raw = torch.rand((1, 1, 1, 64, 64), generator=torch.Generator().manual_seed(3))
    losses = {}
    for background_pairs in (True, False):
        torch.manual_seed(0)  # the same weights
        model = build_model(settings(background_pairs=background_pairs), BACKBONE, OFFSETS)
        with torch.no_grad():
            losses[background_pairs] = training_step(model, model.method)(_batch(labels, annotated, raw),
                                                                           Progress(0, 10)).losses
    assert losses[True]["supervised_explicit"].item() == losses[False]["supervised_explicit"].item()
    assert losses[True]["supervised_implicit"].item() != losses[False]["supervised_implicit"].item()


@pytest.mark.parametrize("detach", [True, False])
def test_the_detached_teacher_gets_no_gradient_from_the_pseudo_loss(detach):
    torch.manual_seed(0)
    model = build_model(settings(detach_teacher=detach), BACKBONE, OFFSETS)
    step = training_step(model, model.method)
    labels, annotated = _instances(1)
    raw = torch.rand((1, 1, 1, 64, 64), generator=torch.Generator().manual_seed(2))
    losses = step(_batch(labels, annotated, raw), Progress(0, 10)).losses
    # E learns from F's prediction: F is the teacher of this term
    losses["pseudo_implicit"].backward()
    teacher = [p.grad for p in model.explicit.backbone.parameters()]
    student = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in student[:1])
    taught = any(g is not None and g.abs().sum() > 0 for g in teacher)
    assert taught is (not detach)


def test_the_ema_teacher_update_is_exact():
    torch.manual_seed(0)
    model = build_model(settings(ema={"decay": 0.9}), BACKBONE, OFFSETS)
    step = training_step(model, model.method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in step.teacher.parameters()]
    step.after_update(Progress(0, 10))
    for old, new, live in zip(before, step.teacher.parameters(), model.parameters()):
        # the formula in float64; float32 rounding is all that differs
        torch.testing.assert_close(new.double(), 0.9 * old.double() + 0.1 * live.double(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(new, old)
    assert not any(p.requires_grad for p in step.teacher.parameters())
    assert {id(p) for p in step.trainable()} == {id(p) for p in model.parameters()}


def test_crac_with_an_ema_teacher_resumes_exactly(tmp_path, nuclei):
    method = settings(ema={"decay": 0.5}).model_dump(mode="json")
    through = Training(nuclei_config(tmp_path / "a", nuclei, method=method, snapshot_every=2), "cpu")
    through.run(4)
    Training(nuclei_config(tmp_path / "b", nuclei, method=method, iterations=2), "cpu").run(2)
    resumed = Training(nuclei_config(tmp_path / "b", nuclei, method=method), "cpu")
    resumed.run(4)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in through.history[2:]]
    for (name, value), other in zip(through.step.teacher.state_dict().items(), resumed.step.teacher.state_dict().values()):
        assert torch.equal(value, other), name
    snapshot = tmp_path / "a" / "experiment" / "snapshots" / "2.zarr"
    assert {"implicit", "explicit", "pseudo_pairs"} <= {p.name for p in snapshot.iterdir()}


def test_a_run_chooses_the_representation_and_records_it(tmp_path):
    torch.manual_seed(0)
    method = settings()
    model = build_model(method, BACKBONE, OFFSETS)
    checkpoint = tmp_path / "crac.pt"
    save_model(checkpoint, method, BACKBONE, OFFSETS, model.state_dict())
    loaded = load_model(checkpoint)
    assert loaded.representation == "embedding" and "embedding" in loaded.outputs(OFFSETS)
    raw = torch.rand((1, 1, 1, 48, 48))
    with torch.no_grad():
        implicit = loaded.affinities(loaded(raw), OFFSETS)
        loaded.representation = "explicit"
        explicit = loaded.affinities(loaded(raw), OFFSETS)
        expected = loaded.explicit.affinities(loaded.explicit(raw), OFFSETS)
    assert torch.equal(explicit, expected) and not torch.allclose(implicit, explicit)
    assert loaded.offsets_error([(0, -7, 0)]) is not None and loaded.reach(OFFSETS) == (0, 0, 0)
    assert "embedding" not in loaded.outputs(OFFSETS)


def _nuclei_run(tmp_path, nuclei, checkpoint, representation=None) -> RunConfig:
    raw, labels = nuclei
    model = {"checkpoint": str(checkpoint)}
    if representation is not None:
        model["representation"] = representation
    return RunConfig(run_dir=str(tmp_path / "run"), raw=raw, roi={"offset": [50, 0, 0], "shape": [2, 520, 696]},
                     model=model, predict={"device": "cpu", "output_shape": [1, 128, 128]},
                     postprocess={"block_shape": [1, 520, 696], "context": [0, 0, 0]})


def test_the_run_record_refuses_a_changed_representation(tmp_path, nuclei):
    method = settings()
    checkpoint = tmp_path / "crac.pt"
    save_model(checkpoint, method, BACKBONE, OFFSETS, build_model(method, BACKBONE, OFFSETS).state_dict())
    default = _nuclei_run(tmp_path, nuclei, checkpoint)
    layout = RunLayout.from_config(default)
    assert layout.representation == "embedding"
    run_dir = RunDir(tmp_path / "run")
    claim_run_dir(run_dir, run_record(layout, default), "run-1")
    # the default named is the same run
    named = _nuclei_run(tmp_path, nuclei, checkpoint, "embedding")
    check_run_dir(run_dir, run_record(RunLayout.from_config(named), named))
    explicit = _nuclei_run(tmp_path, nuclei, checkpoint, "explicit")
    with pytest.raises(UserError, match="made with representation = \"embedding\", this config gives \"explicit\""):
        check_run_dir(run_dir, run_record(RunLayout.from_config(explicit), explicit))


def test_bad_crac_settings_are_one_line(tmp_path, nuclei):
    base = nuclei_config(tmp_path, nuclei, method=settings().model_dump(mode="json")).model_dump(mode="json")
    for method, message in (
        ({"name": "crac"}, "method.crac.entropy"),
        ({"name": "crac", "entropy": {"horizon": 0}}, "horizon"),
        ({"name": "crac", "entropy": None, "ema": {"decay": 0.99}, "detach_teacher": False}, "an EMA teacher takes no gradients"),
        ({"name": "crac", "entropy": None, "ema": {"decay": 1.5}}, "decay"),
        ({"name": "crac", "entropy": None, "teacher": "live"}, "teacher"),
        ({"name": "crac", "entropy": None, "background_pairs": False}, "background_pairs: false needs a foreground head"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**base, "method": method}))
        assert_one_line_error(run_cli("pipeline/train.py", str(path)), message)


def test_a_representation_the_model_lacks_is_one_line(tmp_path, nuclei):
    from pipeline.methods import affinity

    checkpoint = tmp_path / "affinity.pt"
    save_model(checkpoint, affinity.Settings(), BACKBONE, OFFSETS, build_model(affinity.Settings(), BACKBONE, OFFSETS).state_dict())
    crac = tmp_path / "crac.pt"
    save_model(crac, settings(), BACKBONE, OFFSETS, build_model(settings(), BACKBONE, OFFSETS).state_dict())
    for model, representation, message in ((checkpoint, "explicit", "has none to choose"),
                                            (crac, "cosine", "this model offers ['embedding', 'explicit']")):
        config = _nuclei_run(tmp_path, nuclei, model, representation).model_dump(mode="json")
        path = tmp_path / "run.json"
        path.write_text(json.dumps(config))
        assert_one_line_error(run_cli("pipeline/predict.py", str(path)), f"model.representation: {representation!r}")
        assert message in run_cli("pipeline/predict.py", str(path)).stderr
