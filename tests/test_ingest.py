"""ingest.py on the three source kinds, from the real bundled sample."""

from __future__ import annotations

import h5py
import imageio.v3 as iio
import numpy as np
import tifffile
from funlib.persistence import open_ds

from tests.conftest import GROUNDTRUTH_H5, RAW, run_cli


def raw_sections(z0=0, z1=6):
    return np.asarray(open_ds(RAW).data[z0:z1, :64, :80])


def check_volume(path, expected, voxel_size, offset=(0, 0, 0)):
    array = open_ds(path)
    assert tuple(array.voxel_size) == voxel_size
    assert tuple(array.offset) == offset
    assert list(array.axis_names) == ["z", "y", "x"]
    np.testing.assert_array_equal(array[array.roi], expected)


def test_png_section_directory(tmp_path):
    sections = raw_sections()
    for z, section in enumerate(sections):
        iio.imwrite(tmp_path / f"s{z:03d}.png", section)
    out = tmp_path / "out.zarr" / "raw"
    result = run_cli("pipeline/ingest.py", str(tmp_path), "--out", str(out), "--voxel-size", "40", "4", "4", "--offset", "80", "0", "0")
    assert result.returncode == 0, result.stderr
    check_volume(out, sections, (40, 4, 4), (80, 0, 0))


def test_tiff_stack_with_z_range(tmp_path):
    sections = raw_sections(0, 8)
    tifffile.imwrite(tmp_path / "stack.tif", sections)
    out = tmp_path / "out.zarr" / "raw"
    result = run_cli("pipeline/ingest.py", str(tmp_path / "stack.tif"), "--out", str(out), "--voxel-size", "10", "10", "10", "--z-range", "2", "7")
    assert result.returncode == 0, result.stderr
    check_volume(out, sections[2:7], (10, 10, 10))


def test_hdf5_ground_truth_with_body_map(tmp_path):
    out = tmp_path / "gt.zarr" / "labels"
    result = run_cli(
        "pipeline/ingest.py", f"{GROUNDTRUTH_H5}:/stack", "--body-map", f"{GROUNDTRUTH_H5}:/transforms",
        "--out", str(out), "--voxel-size", "10", "10", "10", "--z-range", "100", "104",
    )
    assert result.returncode == 0, result.stderr
    with h5py.File(GROUNDTRUTH_H5) as f:
        supervoxels = f["stack"][100:104]
        table = dict(f["transforms"][:].tolist())
    expected = np.vectorize(lambda s: table.get(int(s), int(s)), otypes=[np.uint64])(supervoxels)
    assert (expected != supervoxels).any()  # the map really changes ids
    check_volume(out, expected, (10, 10, 10))
    assert open_ds(out).dtype == np.uint64


def test_bad_sources_give_one_line_and_exit_2(tmp_path):
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (f"{GROUNDTRUTH_H5}:/nope", "dataset '/nope' not found"),
        (str(GROUNDTRUTH_H5), "name the dataset"),
    ]
    for source, message in cases:
        result = run_cli("pipeline/ingest.py", source, "--out", str(tmp_path / "o.zarr/x"), "--voxel-size", "1", "1", "1")
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_isbi_boundary_masks_become_section_components(isbi):
    from scipy import ndimage

    from tests.conftest import ISBI

    labels = open_ds(isbi[1])
    data = labels[labels.roi]
    assert tuple(labels.voxel_size) == (50, 4, 4)
    ids_per_section = [set(np.unique(section[section > 0]).tolist()) for section in data]
    for z, ids in enumerate(ids_per_section):
        interior = iio.imread(ISBI / "label" / f"{z:02d}.png") != 0
        np.testing.assert_array_equal(data[z] > 0, interior)
        assert len(ids) == ndimage.label(interior)[1] > 10
        assert not ids & set().union(*ids_per_section[:z])  # unique across the stack


def test_sparse_copy_keeps_whole_random_instances(tmp_path, labels):
    dense = open_ds(labels)[open_ds(labels).roi]
    copies = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / "sparse.zarr" / name
        result = run_cli(
            "pipeline/ingest.py", f"{GROUNDTRUTH_H5}:/stack", "--body-map", f"{GROUNDTRUTH_H5}:/transforms",
            "--out", str(out), "--voxel-size", "10", "10", "10", "--keep-instances", "12", "--seed", seed,
        )
        assert result.returncode == 0, result.stderr
        copies[name] = open_ds(str(out))[open_ds(str(out)).roi]
    kept = np.unique(copies["a"][copies["a"] > 0])
    assert len(kept) == 12
    np.testing.assert_array_equal(copies["a"] > 0, np.isin(dense, kept))  # whole instances, nothing else
    np.testing.assert_array_equal(copies["a"][copies["a"] > 0], dense[copies["a"] > 0])
    np.testing.assert_array_equal(copies["a"], copies["b"])
    assert not np.array_equal(copies["a"], copies["c"])
