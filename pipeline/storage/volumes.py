"""Typed access to zarr volumes through funlib.persistence.

Every open goes through here so that a missing container, a missing dataset
or a wrong dtype becomes one clear `UserError` instead of a zarr traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from funlib.geometry import Coordinate, Roi
from funlib.persistence import Array, open_ds, prepare_ds
from numcodecs import Blosc

from pipeline.errors import UserError

# zstd compresses EM intensities and label volumes well at a modest cost;
# bit-shuffle helps the wide integer label types most.
COMPRESSOR = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
# Predictions are written as fast as a GPU makes them and compress little
# (the bundled model's affinities: 1.20x at level 5, 1.16x at level 1), and
# level 1 compresses 4.4x faster (README, "GPU prediction")
PREDICTION_COMPRESSOR = Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE)


def split_path(path: str | Path) -> tuple[Path, str]:
    """`a/b.zarr/c/d` -> (`a/b.zarr`, `c/d`)."""
    text = str(path)
    marker = ".zarr"
    at = text.find(marker + "/")
    if at < 0:
        raise ValueError(f"{text}: expected CONTAINER.zarr/DATASET")
    return Path(text[: at + len(marker)]), text[at + len(marker) + 1 :]


def open_volume(container: Path, dataset: str, *, field: str, dtypes: tuple[str, ...] = (), mode: str = "r") -> Array:
    if not container.exists():
        raise UserError(f"{field}: container {container} does not exist")
    if not (container / dataset).exists():
        raise UserError(f"{field}: dataset {dataset!r} not found in {container}")
    try:
        array = open_ds(container / dataset, mode=mode)
    except Exception as e:  # zarr raises a zoo of types for corrupt metadata
        raise UserError(f"{field}: cannot open {container}/{dataset}: {e}") from e
    if dtypes and array.dtype.name not in dtypes:
        raise UserError(
            f"{field}: {container}/{dataset} has dtype {array.dtype.name}, expected {' or '.join(dtypes)}"
        )
    return array


class VolumeReadError(Exception):
    """A read that failed inside zarr or its codecs, named by dataset and ROI."""


def read_roi(volume: Array, roi: Roi, name: str | Path, fill_value=None) -> np.ndarray:
    """The data in `roi`, `fill_value` (or 0) where it leaves the volume:
    `volume.to_ndarray(roi, fill_value)`, without its cost. That wraps its
    output in a dask array, and dask tokenizes a numpy array by hashing all
    of its bytes (sha1: 0.05 CPU s per agglomerate block). A corrupt chunk
    otherwise fails with only "error during blosc decompression"; this
    names the dataset and the ROI, which is what a user needs to find the
    bad chunk."""
    try:
        shared = volume.roi.intersect(roi)
        if shared == roi:
            return volume[roi]
        channels = tuple(volume.shape[: volume.channel_dims])
        data = np.full(channels + tuple(roi.shape / volume.voxel_size), fill_value or 0, dtype=volume.dtype)
        if not shared.empty:
            data[(slice(None),) * len(channels) + ((shared - roi.begin) / volume.voxel_size).to_slices()] = volume[shared]
        return data
    except Exception as e:
        raise VolumeReadError(f"cannot read {name} at {roi}: {type(e).__name__}: {e}") from e


# what an affinity dataset may hold: see as_uint8
AFFINITY_DTYPES = ("uint8", "float32", "float64")


def as_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 datasets hold them: 0..255, rounded. The
    post-processing steps read affinities in this one form, whether the
    predict step wrote them or another tool did (as floats)."""
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


def read_affinities(volume: Array, roi: Roi, name: str | Path, fill_value=None) -> np.ndarray:
    """`read_roi` of an affinity dataset, as uint8 (`as_uint8`)."""
    data = read_roi(volume, roi, name, fill_value)
    return data if data.dtype == np.uint8 else as_uint8(data)


# voxels per chunk axis at most: 64^3 chunks (2 MiB of uint64) let viewers
# and partial reads fetch little, and keep a block to a few hundred files
CHUNK_LIMIT = 64
# below this, a chunk axis would make too many tiny files: keep the block's
SMALLEST_CHUNK = 16


def dividing_chunks(block: Coordinate) -> tuple[int, ...]:
    """Per axis, the largest divisor of the block's extent (voxels) that is
    at most CHUNK_LIMIT, so that chunks tile every block exactly. An extent
    with no divisor from SMALLEST_CHUNK to CHUNK_LIMIT (a prime, say) stays
    whole."""
    chunks = []
    for extent in block:
        divisor = max(d for d in range(1, min(extent, CHUNK_LIMIT) + 1) if extent % d == 0)
        chunks.append(divisor if divisor >= min(extent, SMALLEST_CHUNK) else extent)
    return tuple(chunks)


def prepare_volume(
    container: Path,
    dataset: str,
    roi: Roi,
    voxel_size: Coordinate,
    dtype: str,
    block_shape: Coordinate,
    channels: int | None = None,
    compressor: Blosc = COMPRESSOR,
) -> Array:
    """Create (or reopen, if compatible) a dataset written in blocks of
    `block_shape`, in chunks that tile each block (`dividing_chunks`), so
    that no two workers ever write the same chunk."""
    spatial = tuple(roi.shape / voxel_size)
    chunks = dividing_chunks(block_shape / voxel_size)
    if channels is not None:
        spatial = (channels, *spatial)
        chunks = (channels, *chunks)
    axis_names = (["c^"] if channels is not None else []) + ["z", "y", "x"]
    return prepare_ds(
        str(container / dataset),
        shape=spatial,
        offset=roi.offset,
        voxel_size=voxel_size,
        axis_names=axis_names,
        units=["nm"] * 3,
        chunk_shape=chunks,
        dtype=np.dtype(dtype),
        mode="a",
        compressor=compressor,
    )

