"""Every backbone's reported geometry matches what its forward pass does,
since the predict step and training derive all shapes from it."""

from __future__ import annotations

import pytest
import torch

from networks.models import build_backbone
from tests.conftest import affinity_model

OFFSETS_3D = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, -9)]
OFFSETS_2D = [(0, -1, 0), (0, 0, -1), (0, -3, 0), (0, 0, -3)]

BACKBONES = {
    "mala_unet": ({"name": "mala_unet", "num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[1, 2, 2], [1, 2, 2]]}, OFFSETS_3D),
    "residual_unet_anisotropic": ({"name": "residual_unet", "widths": [4, 6, 8, 10, 12]}, OFFSETS_3D),
    "residual_unet_isotropic": (
        {"name": "residual_unet", "widths": [4, 6, 8], "downsample_factors": [[2, 2, 2], [2, 2, 2]], "crop": [4, 4, 4]},
        OFFSETS_3D,
    ),
    "residual_unet_2d": (
        {"name": "residual_unet", "dims": 2, "widths": [4, 6, 8, 10, 12], "crop": [0, 8, 8]},
        OFFSETS_2D,
    ),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_pass_has_the_reported_shapes(name):
    spec, offsets = BACKBONES[name]
    net = affinity_model(spec, offsets).eval()
    geometry = net.geometry
    output = geometry.valid_output_shape((3, 20, 20))
    assert all(o >= w for o, w in zip(output, (3, 20, 20)))
    assert all(o % a == 0 for o, a in zip(output, geometry.alignment))
    shape = geometry.input_shape(output)
    with torch.no_grad():
        out = net(torch.rand(1, 1, *shape))["affinities"]
    assert tuple(out.shape) == (1, len(offsets), *output)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # an input the geometry rejects is one whose pooling would not divide
    wrong = (shape[0], shape[1] + 1, shape[2])
    assert geometry.axis_output(wrong[1], 1) is None


def test_the_2d_network_sees_each_section_alone():
    spec, _ = BACKBONES["residual_unet_2d"]
    # some random initialisations give a network whose ReLUs are all dead,
    # whose output ignores the input: fix one that does not
    torch.manual_seed(0)
    net = build_backbone(spec).eval()
    raw = torch.rand(1, 1, 3, 48, 48)
    changed = raw.clone()
    changed[:, :, 1] = torch.rand(48, 48)
    with torch.no_grad():
        a, b = net(raw), net(changed)
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and torch.equal(a[:, :, 2], b[:, :, 2])
    assert not torch.equal(a[:, :, 1], b[:, :, 1])


def test_residual_unet_rejects_a_crop_off_the_pooling_grid():
    with pytest.raises(ValueError, match="multiple of the total downsampling"):
        build_backbone({"name": "residual_unet", "widths": [4, 6], "downsample_factors": [[1, 4, 4]], "crop": [0, 1, 1]})


def test_an_unreachable_alignment_is_an_error_not_a_hang():
    # MALA with 3x pooling never outputs a multiple of 9 in-plane
    net = build_backbone({"name": "mala_unet", "num_fmaps": 2, "downsample_factors": [[1, 3, 3], [1, 3, 3]]})
    with pytest.raises(ValueError, match="multiple of the total downsampling 9"):
        net.geometry.valid_output_shape((3, 20, 20))
