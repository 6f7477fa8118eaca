"""ingest.py on the three source kinds, from the real bundled sample."""

from __future__ import annotations

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr
from funlib.persistence import open_ds

from tests.conftest import GROUNDTRUTH_H5, NUCLEI, RAW, run_cli


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


def test_damaged_sources_and_bad_arguments_give_one_line_and_exit_2(tmp_path):
    """Each was a traceback."""
    with h5py.File(tmp_path / "grouped.h5", "w") as f:
        f.create_group("volumes").create_dataset("raw", data=np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "corrupt").mkdir()
    iio.imwrite(tmp_path / "corrupt" / "0.png", raw_sections(0, 1)[0])
    (tmp_path / "corrupt" / "1.png").write_bytes((tmp_path / "corrupt" / "0.png").read_bytes()[:60])
    (tmp_path / "notes.tif").write_text("not a TIFF, a text file\n")
    tifffile.imwrite(tmp_path / "deep.tif", np.full((2, 8, 8), 4000, np.uint16))
    good = str(tmp_path / "corrupt" / "0.png")
    cases = [
        ([f"{tmp_path / 'grouped.h5'}:/volumes"], "is an HDF5 group, not a dataset; it holds ['raw']"),
        ([str(tmp_path / "corrupt")], f"cannot read {tmp_path / 'corrupt' / '1.png'} as an image"),
        ([str(tmp_path / "notes.tif")], f"cannot read {tmp_path / 'notes.tif'} as an image"),
        ([good, "--voxel-size", "0", "1", "1"], "--voxel-size: every value must be positive, got 0 1 1"),
        ([good, "--voxel-size", "-4", "1", "1"], "--voxel-size: every value must be positive, got -4 1 1"),
        ([good, "--chunk-shape", "0", "64", "64"], "--chunk-shape: every value must be positive"),
        ([str(tmp_path / "deep.tif")], "holds uint16 intensities and affseg's raw is 8-bit: pass --percentiles"),
        ([str(tmp_path / "deep.tif"), "--labels", "--percentiles", "1", "99"], "labels keep their ids"),
    ]
    for args, message in cases:
        if "--voxel-size" not in args:
            args = [*args, "--voxel-size", "1", "1", "1"]
        result = run_cli("pipeline/ingest.py", *args, "--out", str(tmp_path / "o.zarr/x"))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "o.zarr" / "x").exists()


def test_ingesting_over_an_existing_dataset_needs_overwrite(tmp_path):
    sections = raw_sections(0, 4)
    tifffile.imwrite(tmp_path / "a.tif", sections)
    tifffile.imwrite(tmp_path / "b.tif", sections[:, :50, :60])
    out = tmp_path / "out.zarr" / "raw"
    assert run_cli("pipeline/ingest.py", str(tmp_path / "a.tif"), "--out", str(out), "--voxel-size", "1", "1", "1").returncode == 0
    result = run_cli("pipeline/ingest.py", str(tmp_path / "b.tif"), "--out", str(out), "--voxel-size", "1", "1", "1")
    assert result.returncode == 2 and f"--out: {out} exists already; pass --overwrite" in result.stderr, result.stderr
    check_volume(out, sections, (1, 1, 1))
    result = run_cli("pipeline/ingest.py", str(tmp_path / "b.tif"), "--out", str(out), "--voxel-size", "1", "1", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    check_volume(out, sections[:, :50, :60], (1, 1, 1))


def test_16_bit_intensities_are_mapped_to_uint8_by_percentiles_and_recorded(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(1000, 3000, (4, 60, 70)).astype(np.uint16)
    deep[0, 0, 0], deep[0, 0, 1] = 0, 65535  # outliers the percentiles clip
    tifffile.imwrite(tmp_path / "deep.tif", deep)
    out = tmp_path / "out.zarr" / "raw"
    result = run_cli("pipeline/ingest.py", str(tmp_path / "deep.tif"), "--out", str(out), "--voxel-size", "1", "1", "1",
                     "--percentiles", "1", "99")
    assert result.returncode == 0, result.stderr
    low, high = np.percentile(deep.astype(np.float64), [1, 99])
    expected = np.round(np.clip((deep - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    check_volume(out, expected, (1, 1, 1))
    record = zarr.open_array(str(out), mode="r").attrs["intensity_mapping"]
    assert record["source_dtype"] == "uint16" and record["percentiles"] == [1, 99]
    assert record["range"] == pytest.approx([low, high])


def test_palette_png_labels_give_their_indices_not_colours(tmp_path):
    from PIL import Image

    ids = np.zeros((2, 30, 40), np.uint8)
    ids[0, 2:10, 3:20], ids[0, 15:25, 5:9], ids[1, 4:28, 10:30] = 1, 2, 3
    for z, section in enumerate(ids):
        image = Image.fromarray(section, mode="P")
        image.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0] * 756)
        image.save(tmp_path / f"{z}.png")
    out = tmp_path / "out.zarr" / "labels"
    result = run_cli("pipeline/ingest.py", str(tmp_path), "--labels", "--out", str(out), "--voxel-size", "1", "1", "1")
    assert result.returncode == 0, result.stderr
    check_volume(out, ids, (1, 1, 1))


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


def test_sparse_nuclei_keep_a_fraction_of_each_pages_instances_and_know_the_background(tmp_path):
    """Page ids restart on every page: an instance is (page, id). The mask
    annotates the kept nuclei and the background, nothing else."""
    dense = tifffile.imread(NUCLEI / "labels.tif")[:6]
    source = tmp_path / "pages.tif"
    tifffile.imwrite(source, dense)
    copies = {}
    for seed in ("0", "0", "1"):
        out = tmp_path / f"sparse_{seed}.zarr"
        result = run_cli("pipeline/ingest.py", str(source), "--labels", "--keep-instances", "0.1", "--seed", seed,
                         "--ids-per-section", "--annotation-mask", str(out / "mask"), "--out", str(out / "labels"),
                         "--voxel-size", "1", "1", "1", "--overwrite")
        assert result.returncode == 0, result.stderr
        labels, mask = (zarr.open(str(out / name), "r")[:] for name in ("labels", "mask"))
        copies.setdefault(seed, []).append(labels)
        np.testing.assert_array_equal(mask == 1, (dense == 0) | (labels != 0))
        np.testing.assert_array_equal(labels[labels != 0], dense[labels != 0])
        instances = {(z, i) for z in range(len(dense)) for i in np.unique(dense[z][dense[z] > 0])}
        kept = {(z, i) for z in range(len(dense)) for i in np.unique(labels[z][labels[z] > 0])}
        assert len(kept) == round(0.1 * len(instances))
        for z, i in kept:  # whole instances
            np.testing.assert_array_equal(labels[z] == i, dense[z] == i)
        # kept on many pages, not one id on every page
        assert len({z for z, _ in kept}) == len(dense) and len({i for _, i in kept}) > len(kept) / 2
    assert np.array_equal(*copies["0"]) and not np.array_equal(copies["0"][0], copies["1"][0])
    lone = run_cli("pipeline/ingest.py", str(source), "--labels", "--annotation-mask", str(tmp_path / "m.zarr/mask"),
                   "--out", str(tmp_path / "m.zarr/labels"), "--voxel-size", "1", "1", "1")
    assert lone.returncode == 2 and "--annotation-mask belongs to --keep-instances" in lone.stderr


def test_multi_channel_16_bit_intensities_are_mapped_channel_by_channel(tmp_path):
    """Two stains of different brightness: one range each."""
    rng = np.random.default_rng(1)
    stains = np.stack([rng.integers(100, 400, (3, 40, 50)), rng.integers(2000, 60000, (3, 40, 50))]).astype(np.uint16)
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["raw"] = stains
    out = tmp_path / "out.zarr" / "raw"
    result = run_cli("pipeline/ingest.py", f"{tmp_path / 'two.h5'}:/raw", "--out", str(out), "--voxel-size", "1", "1", "1",
                     "--percentiles", "0", "100")
    assert result.returncode == 0, result.stderr
    array = open_ds(out)
    assert array.shape == (2, 3, 40, 50) and array.channel_dims == 1
    ranges = [(float(s.min()), float(s.max())) for s in stains]
    expected = np.stack([np.round((s - lo) / (hi - lo) * 255) for s, (lo, hi) in zip(stains.astype(np.float64), ranges)])
    np.testing.assert_array_equal(array[array.roi], expected.astype(np.uint8))
    assert zarr.open_array(str(out), mode="r").attrs["intensity_mapping"]["range"] == [list(r) for r in ranges]
