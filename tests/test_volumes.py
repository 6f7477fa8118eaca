"""`read_roi` equals funlib.persistence's own `to_ndarray` with a fill value,
whose cost it avoids, inside the volume, across its edge and outside it."""

from __future__ import annotations

import numpy as np
import pytest
from funlib.geometry import Roi
from funlib.persistence import open_ds, prepare_ds

from pipeline.storage.volumes import read_roi

ROIS = [
    Roi((20, 40, 0), (40, 40, 60)),  # inside
    Roi((-20, 40, 90), (60, 80, 60)),  # across the edge, on two sides
    Roi((200, 0, 0), (20, 20, 20)),  # outside
]


@pytest.mark.parametrize("fill_value", [0, 7])
@pytest.mark.parametrize("roi", ROIS, ids=["inside", "across", "outside"])
def test_read_roi_equals_to_ndarray(tmp_path, roi, fill_value):
    rng = np.random.default_rng(0)
    volume = prepare_ds(tmp_path / "v.zarr" / "affs", shape=(4, 10, 12, 14), offset=(0, 0, 0), voxel_size=(10, 10, 10),
                        axis_names=["c^", "z", "y", "x"], dtype=np.uint8, chunk_shape=(4, 5, 6, 7))
    volume[volume.roi] = rng.integers(1, 256, size=(4, 10, 12, 14), dtype=np.uint8)
    volume = open_ds(tmp_path / "v.zarr" / "affs")
    expected = volume.to_ndarray(roi, fill_value=fill_value)
    np.testing.assert_array_equal(read_roi(volume, roi, "affs", fill_value), expected)
    # with the channel selection the workers apply
    volume.lazy_op(np.s_[0:3])
    got = read_roi(volume, roi, "affs", fill_value)
    assert got.shape == (3, *(roi.shape / volume.voxel_size))
    np.testing.assert_array_equal(got, expected[:3])
