"""Typed access to zarr volumes through funlib.persistence.

Every open goes through here so that a missing container, a missing dataset
or a wrong dtype becomes one clear `UserError` instead of a zarr traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from funlib.geometry import Coordinate, Roi
from funlib.persistence import Array, open_ds, prepare_ds
from numcodecs import Blosc

from pipeline.errors import UserError

# zstd compresses EM intensities and label volumes well at a modest cost;
# bit-shuffle helps the wide integer label types most.
COMPRESSOR = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
# Predictions are written as fast as a GPU makes them, read by every
# post-processing step, and compress little (the bundled model's affinities:
# 1.14x with zstd level 1 and bit-shuffle, 1.02x with lz4): lz4 without a
# shuffle encodes 5x and decodes 12x faster than zstd level 1 with one
# (2.1 against 0.42, 8.2 against 0.67 GB/s on a 2-core EPYC VM), which
# made the mutex path's three block steps 1.15x faster on the bench
# (docs/performance.md, "Reading the affinities"); background compresses
# well either way
PREDICTION_COMPRESSOR = Blosc(cname="lz4", clevel=1, shuffle=Blosc.NOSHUFFLE)


def split_path(path: str | Path) -> tuple[Path, str]:
    """`a/b.zarr/c/d` -> (`a/b.zarr`, `c/d`)."""
    text = str(path)
    marker = ".zarr"
    at = text.find(marker + "/")
    if at < 0:
        raise ValueError(f"{text}: expected CONTAINER.zarr/DATASET")
    return Path(text[: at + len(marker)]), text[at + len(marker) + 1 :]


# nanometres per unit of the OME-Zarr (NGFF) axis units affseg reads
NGFF_UNITS_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6}


def ngff_geometry(path: Path, field: str) -> dict | None:
    """funlib open_ds arguments (voxel size and offset in nm, axis names)
    from OME-Zarr (NGFF 0.4) multiscales metadata of the group holding the
    array at `path`, or None where there is none. funlib reads such an
    array with voxel size 1, which made the errors blame the ROI."""
    attrs = path.parent / ".zattrs"
    if not attrs.exists():
        return None
    try:
        group = json.loads(attrs.read_text())
    except ValueError as e:
        raise UserError(f"{field}: cannot open {path}: its group's .zattrs is not JSON ({e})") from e
    for scales in group.get("multiscales", []) if isinstance(group, dict) else []:
        entry = next((d for d in scales.get("datasets", []) if d.get("path") == path.name), None)
        if entry is None:
            continue
        axes = scales["axes"]
        kinds = [a.get("type", "space" if a["name"] in "zyx" else "channel") for a in axes]
        if "time" in kinds or kinds.count("space") != 3:
            raise UserError(f"{field}: {path} is an OME-Zarr image with axes {[a['name'] for a in axes]}; "
                            f"affseg reads 3 space axes (z, y, x) and at most a channel axis")
        scale, translation = np.ones(len(axes)), np.zeros(len(axes))
        for transforms in (entry.get("coordinateTransformations", []), scales.get("coordinateTransformations", [])):
            for t in transforms:
                # applied in order, the dataset's first: x -> s * x + t
                if t["type"] == "scale":
                    scale = scale * np.array(t["scale"], dtype=float)
                    translation = translation * np.array(t["scale"], dtype=float)
                elif t["type"] == "translation":
                    translation = translation + np.array(t["translation"], dtype=float)
        space = [i for i, k in enumerate(kinds) if k == "space"]
        units = [axes[i].get("unit") for i in space]
        if any(u not in NGFF_UNITS_NM for u in units):
            raise UserError(f"{field}: {path}: OME-Zarr axis units {units}; affseg reads {sorted(NGFF_UNITS_NM)}")
        nm = np.array([NGFF_UNITS_NM[u] for u in units])
        voxel = scale[space] * nm
        rounded = np.maximum(np.round(voxel), 1)
        if np.any(np.abs(rounded - voxel) > 0.01 * voxel):
            raise UserError(f"{field}: {path}: its OME-Zarr voxel size {voxel.tolist()} nm is not a whole number of nm; "
                            f"affseg's voxel sizes are integer nm")
        offset = np.round(translation[space] * nm / rounded) * rounded
        names = [f"{axes[i]['name']}^" if k == "channel" else axes[i]["name"] for i, k in enumerate(kinds)]
        return {"voxel_size": [int(v) for v in rounded], "offset": [int(o) for o in offset], "axis_names": names,
                "units": ["nm"] * 3}
    return None


# what to do with raw of another dtype than uint8 (16-bit and float light microscopy)
RAW_DTYPE_HINT = ("; affseg predicts and trains on 8-bit raw: convert it with pipeline/ingest.py SOURCE --percentiles "
                  "0.1 99.9 (intensities at those percentiles become 0 and 255; the mapping is recorded in the dataset)")


def open_volume(container: Path, dataset: str, *, field: str, dtypes: tuple[str, ...] = (), mode: str = "r",
                dtype_hint: str = "") -> Array:
    if not container.exists():
        raise UserError(f"{field}: container {container} does not exist")
    if not (container / dataset).exists():
        raise UserError(f"{field}: dataset {dataset!r} not found in {container}")
    geometry = ngff_geometry(container / dataset, field)
    attrs = container / dataset / ".zattrs"
    try:
        recorded = json.loads(attrs.read_text()) if attrs.exists() else {}
    except ValueError as e:
        raise UserError(f"{field}: cannot open {container}/{dataset}: its .zattrs is not JSON ({e})") from e
    if geometry is None and (container / dataset / ".zarray").exists() and not {"voxel_size", "resolution"} & set(recorded):
        # funlib would read it with voxel size 1 and offset 0
        raise UserError(
            f"{field}: {container}/{dataset} records no voxel size (neither funlib's voxel_size and offset attributes "
            f"nor OME-Zarr multiscales); write it with pipeline/ingest.py --voxel-size, or add those attributes"
        )
    try:
        array = open_ds(container / dataset, mode=mode, **(geometry or {}))
    except Exception as e:  # zarr raises a zoo of types for corrupt metadata
        raise UserError(f"{field}: cannot open {container}/{dataset}: {e}") from e
    if dtypes and array.dtype.name not in dtypes:
        raise UserError(
            f"{field}: {container}/{dataset} has dtype {array.dtype.name}, expected {' or '.join(dtypes)}{dtype_hint}"
        )
    return array


class VolumeReadError(Exception):
    """A read that failed inside zarr or its codecs, or met a missing chunk,
    named by dataset and ROI."""


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files behind a zarr (v2) dataset on disk.

    zarr reads a chunk that has no file as the fill value, without a word:
    an incomplete copy of raw would be predicted as black, and a run volume
    whose chunk was deleted would be built on as empty. So every read
    checks that the chunks it meets exist (`first_missing`), and a resumed
    run lists them all (`stored`) to find the blocks whose output is gone.
    Listing names costs no stat per file (README, "Crashes, resume")."""

    directory: Path
    chunks: tuple[int, ...]  # voxels per chunk, every axis (channels first)
    grid: tuple[int, ...]  # chunks per axis
    separator: str  # zarr's dimension_separator: "/" nested, "." flat
    begin: Coordinate  # world units, the volume's first voxel
    voxel_size: Coordinate
    channel_dims: int

    @classmethod
    def of(cls, volume: Array) -> ChunkFiles:
        # the zarr.Array behind funlib's Array: its DirectoryStore's folder
        source = volume._source_data
        directory = Path(source.store.path) / source.path
        meta = json.loads((directory / ".zarray").read_text())
        return cls(
            directory=directory,
            chunks=tuple(meta["chunks"]),
            grid=tuple(-(-s // c) for s, c in zip(meta["shape"], meta["chunks"])),
            separator=meta.get("dimension_separator") or ".",
            begin=volume.roi.begin,
            voxel_size=volume.voxel_size,
            channel_dims=len(meta["shape"]) - volume.voxel_size.dims,
        )

    @property
    def spatial_chunk(self) -> Coordinate:
        """A chunk's extent in world units."""
        return Coordinate(self.chunks[self.channel_dims:]) * self.voxel_size

    def ranges(self, roi: Roi) -> list[range]:
        """Per axis (channels first: all of them), the chunk indices that
        `roi` meets; empty where `roi` misses the volume."""
        extent = self.spatial_chunk
        spatial = []
        for b, e, origin, size, n in zip(roi.begin, roi.end, self.begin, extent, self.grid[self.channel_dims:]):
            spatial.append(range(max(0, (b - origin) // size), min(n, -(-(e - origin) // size))))
        return [range(n) for n in self.grid[: self.channel_dims]] + spatial

    def key(self, index: tuple[int, ...]) -> str:
        return self.separator.join(str(i) for i in index)

    def first_missing(self, roi: Roi) -> str | None:
        """The key of the first chunk `roi` meets that has no file, or None."""
        for index in itertools.product(*self.ranges(roi)):
            if not os.path.exists(self.directory / self.key(index)):
                return self.key(index)
        return None

    def first_unlisted(self, roi: Roi) -> str | None:
        """`first_missing` from one listing of the dataset (`stored`): for
        a whole volume, where a check per chunk would stat every file."""
        ranges = self.ranges(roi)[self.channel_dims:]
        if not all(ranges):
            return None
        box = self.stored()[np.ix_(*ranges)]
        if box.all():
            return None
        first = np.argwhere(~box)[0]
        return self.key((0,) * self.channel_dims + tuple(r[i] for r, i in zip(ranges, first)))

    def listing_digest(self) -> str:
        """SHA-256 of every chunk file's key, size and modification time
        (ns): a chunk rewritten, added or removed changes it, unless a
        rewrite keeps both size and mtime. One stat per chunk file, and one
        digest update per directory (README, "Crashes, resume": the cost)."""
        digest = hashlib.sha256()
        pending = [("", str(self.directory))]
        while pending:
            prefix, directory = pending.pop()
            lines = []
            with os.scandir(directory) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.name.startswith("."):
                        continue  # .zarray, .zattrs: the geometry is checked on its own
                    if entry.is_dir():
                        pending.append((prefix + entry.name + "/", entry.path))
                    else:
                        stat = entry.stat()
                        lines.append(f"{prefix}{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
            digest.update("".join(lines).encode())
        return digest.hexdigest()

    def stored(self) -> np.ndarray:
        """A bool per spatial chunk: whether its files (all channels) exist."""
        present = np.zeros(self.grid, dtype=bool)
        if self.separator == "/":
            self._walk(self.directory, (), present)
        else:
            for name in os.listdir(self.directory):
                index = self._index(name.split("."))
                if index is not None:
                    present[index] = True
        return present.all(axis=tuple(range(self.channel_dims))) if self.channel_dims else present

    def _walk(self, directory: Path, prefix: tuple[int, ...], present: np.ndarray) -> None:
        names = os.listdir(directory)
        if len(prefix) == len(self.grid) - 1:
            last = np.array([int(n) for n in names if n.isdigit()], dtype=np.int64)
            present[prefix + (last[last < self.grid[-1]],)] = True
            return
        for name in names:
            if name.isdigit() and int(name) < self.grid[len(prefix)]:
                self._walk(directory / name, prefix + (int(name),), present)

    def _index(self, parts: list[str]) -> tuple[int, ...] | None:
        if len(parts) != len(self.grid) or not all(p.isdigit() for p in parts):
            return None
        index = tuple(int(p) for p in parts)
        return index if all(i < n for i, n in zip(index, self.grid)) else None


# what a chunk without a file means when a volume is read: an error (the
# default everywhere), or the fill value, for inputs that are sparse on
# purpose (RunConfig.raw_missing_chunks)
MissingChunks = Literal["error", "empty"]


def read_roi(volume: Array, roi: Roi, name: str | Path, fill_value=None, missing: MissingChunks = "error") -> np.ndarray:
    """The data in `roi`, `fill_value` (or 0) where it leaves the volume:
    `volume.to_ndarray(roi, fill_value)`, without its cost. That wraps its
    output in a dask array, and dask tokenizes a numpy array by hashing all
    of its bytes (sha1: 0.05 CPU s per agglomerate block). A corrupt chunk
    otherwise fails with only "error during blosc decompression"; this
    names the dataset and the ROI, which is what a user needs to find the
    bad chunk. A chunk inside the volume without a file is an error unless
    `missing` is "empty" (ChunkFiles)."""
    if missing == "error":
        files = ChunkFiles.of(volume)
        absent = files.first_missing(roi)
        if absent is not None:
            raise VolumeReadError(
                f"cannot read {name} at {roi}: its chunk {files.directory / absent} is missing "
                f"(an incomplete copy, or a deleted file), which zarr would read as zeros"
            )
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


def holds_nonzero(volume: Array, roi: Roi, name: str | Path) -> bool:
    """Whether any voxel in `roi` is non-zero, read chunk by chunk and
    stopping at the first: at once for real labels, one read of `roi` for
    empty ones."""
    files = ChunkFiles.of(volume)
    extent = files.spatial_chunk
    for index in itertools.product(*files.ranges(roi)[files.channel_dims:]):
        chunk = Roi(files.begin + Coordinate(index) * extent, extent).intersect(roi)
        if read_roi(volume, chunk, name).any():
            return True
    return False


# what an affinity dataset may hold: see as_uint8
AFFINITY_DTYPES = ("uint8", "float32", "float64")


def as_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 datasets hold them: 0..255, rounded. The
    post-processing steps read affinities in this one form, whether the
    predict step wrote them or another tool did (as floats)."""
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


def _refuse_outside(data: np.ndarray, high: float, roi: Roi, name: str | Path, advice: str) -> None:
    """A VolumeReadError naming the first value of `data` outside [0,
    `high`] (NaN included) and how many there are, followed by `advice`."""
    outside = ~((data >= 0) & (data <= high))
    if outside.any():
        raise VolumeReadError(
            f"{name} at {roi} holds {float(data[outside][0]):g} ({np.count_nonzero(outside)} values outside "
            f"[0, {high:g}]): {advice}"
        )


def read_affinities(volume: Array, roi: Roi, name: str | Path, fill_value=None) -> np.ndarray:
    """`read_roi` of an affinity dataset, as uint8 (`as_uint8`). Float
    values outside [0, 1], and NaN, are refused: clipped, affinities on a
    0..255 scale would be one segment and values in [-1, 1] none."""
    data = read_roi(volume, roi, name, fill_value)
    if data.dtype == np.uint8:
        return data
    _refuse_outside(data, 1, roi, name, "float affinities must be probabilities in [0, 1], without NaN; rescale "
                                        "them (a 0..255 scale: divide by 255) or store them as uint8")
    return as_uint8(data)


def read_uncertainty(volume: Array, roi: Roi, name: str | Path) -> np.ndarray:
    """`read_roi` of a model's uncertainty (the latent-mask method's
    MaskAggr variance, of values in [0, 1]: within [0, 0.25]). NaN and
    values outside are refused: a NaN would sort anywhere in the
    proofreading list and make an edge's mean NaN, a negative one would
    pass for certainty."""
    data = read_roi(volume, roi, name)
    _refuse_outside(data, 0.25, roi, name, "an uncertainty is the variance of values in [0, 1]; the volume is "
                                           "damaged, or not a model's uncertainty")
    return data


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

