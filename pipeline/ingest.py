"""Turn a PNG/TIFF section stack or an HDF5 dataset into a zarr dataset.

    python pipeline/ingest.py SOURCE --out CONTAINER.zarr/DATASET --voxel-size Z Y X

SOURCE is one of
  - a directory of PNG or TIFF sections, one file per z, sorted by name;
  - a multi-page TIFF file (pages are z);
  - FILE.h5:/path/to/dataset (also .hdf5, .hdf).

Ground truth given as supervoxels plus a supervoxel -> body table (as in the
FlyEM FIB-SEM samples) is mapped to bodies with --body-map FILE.h5:/table;
supervoxels missing from the table keep their id.

Boundary masks such as the ISBI 2012 labels (non-zero = cell interior)
become instance labels with --components: the connected components of the
interior of each section, numbered across the stack.

--keep-instances makes a sparse copy of dense labels: N (or, below 1, that
fraction of) whole instances chosen at random with --seed; every other voxel
becomes 0, which training reads as "unknown" (`sparse: true`). For data
whose background is known (nuclei: label 0 is background, not unknown),
--annotation-mask also writes the mask training takes as `labels_mask`: 1 on
the kept instances and on the background, 0 on the other instances. With
--ids-per-section an instance is one section's id (independent 2D images
whose ids restart on every page).

The volume is read and written in slabs of one chunk depth, so memory stays
bounded by a slab (plus the list of instance ids with --keep-instances).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from funlib.geometry import Coordinate, Roi
import zarr
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python pipeline/ingest.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import cli_main
from pipeline.errors import UserError
from pipeline.kernels.lut import apply_mapping
from pipeline.storage.volumes import prepare_volume, split_path

SECTION_SUFFIXES = (".png", ".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


# colour images: (y, x, c) sections with up to this many channels (RGB, RGBA)
MAX_SECTION_CHANNELS = 4


class SectionStack:
    """A directory of 2D images, or one multi-page TIFF, read lazily by z.
    Sections are single-channel (y, x) or colour (y, x, c); `read` gives
    (z, y, x), or (c, z, y, x) for colour, and `shape` is (z, y, x)."""

    def __init__(self, path: Path, labels: bool):
        self.labels = labels
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in SECTION_SUFFIXES)
            if not self.files:
                raise UserError(f"source: {path} holds no PNG or TIFF sections")
            first = self._read_file(self.files[0])
            self.pages = None
            depth = len(self.files)
        else:
            self.files = []
            self.pages = _read_image(path, labels)
            if self.pages.ndim not in (3, 4):
                raise UserError(f"source: {path} is not a stack of 2D pages (shape {self.pages.shape})")
            first = self.pages[0]
            depth = len(self.pages)
        if first.ndim not in (2, 3) or (first.ndim == 3 and first.shape[-1] > MAX_SECTION_CHANNELS):
            raise UserError(f"source: sections must be 2D images, single-channel or colour (y, x, c <= "
                            f"{MAX_SECTION_CHANNELS}), got shape {first.shape}")
        if labels and first.ndim == 3:
            raise UserError(f"source: label images must hold one id per pixel, got colour sections {first.shape}; "
                            f"save them as palette (indexed) or greyscale images of ids")
        self.section_shape = first.shape
        self.channels = first.shape[2] if first.ndim == 3 else None
        self.shape = (depth, *first.shape[:2])
        self.dtype = first.dtype

    def _read_file(self, path: Path) -> np.ndarray:
        return _read_image(path, self.labels)

    def read(self, z0: int, z1: int) -> np.ndarray:
        if self.pages is not None:
            data = self.pages[z0:z1]
        else:
            sections = [self._read_file(f) for f in self.files[z0:z1]]
            for f, s in zip(self.files[z0:z1], sections):
                if s.shape != self.section_shape:
                    raise UserError(f"source: section {f.name} has shape {s.shape}, expected {self.section_shape}")
            data = np.stack(sections)
        # colour: channels first, as zarr datasets of affseg hold them
        return np.moveaxis(data, -1, 0) if self.channels else data


def _read_image(path: Path, labels: bool = False) -> np.ndarray:
    """A PNG or TIFF file's pixels; a file that is not one (corrupt,
    truncated, text under an image's name) is one line naming it. A
    palette (indexed) PNG of labels gives its indices, which are the ids,
    not the colours its palette paints them in."""
    try:
        if path.suffix.lower() == ".png":
            import imageio.v3 as iio

            if labels and iio.immeta(path).get("mode") == "P":
                return iio.imread(path, mode="P")
            return iio.imread(path)
        import tifffile

        return tifffile.imread(path)
    except Exception as e:  # noqa: BLE001 - the image libraries raise a zoo of types
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"source: cannot read {path} as an image: {reason}") from e


class Hdf5Dataset:
    """An HDF5 dataset (z, y, x), or (c, z, y, x) for multi-channel raw."""

    def __init__(self, spec: str, labels: bool):
        import h5py

        path, dataset = _split_hdf5(spec)
        try:
            self._file = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"source: cannot open {path} as HDF5: {' '.join(str(e).split())}") from e
        if dataset not in self._file:
            raise UserError(f"source: dataset {dataset!r} not found in {path}")
        if not isinstance(self._file[dataset], h5py.Dataset):
            raise UserError(f"source: {spec} is an HDF5 group, not a dataset; it holds {sorted(self._file[dataset])[:8]}")
        self._data = self._file[dataset]
        if self._data.ndim not in (3, 4):
            raise UserError(f"source: {spec} must be 3D (z, y, x) or 4D (c, z, y, x), has shape {self._data.shape}")
        if labels and self._data.ndim == 4:
            raise UserError(f"source: labels must be 3D (z, y, x), {spec} has shape {self._data.shape}")
        self.channels = self._data.shape[0] if self._data.ndim == 4 else None
        self.shape = self._data.shape[-3:]
        self.dtype = self._data.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:
        return self._data[:, z0:z1] if self.channels else self._data[z0:z1]


def _split_hdf5(spec: str) -> tuple[Path, str]:
    path, _, dataset = spec.partition(":")
    if not dataset:
        raise UserError(f"source: {spec}: name the dataset as FILE.h5:/dataset")
    if not Path(path).exists():
        raise UserError(f"source: {path} does not exist")
    return Path(path), dataset


def open_source(spec: str, labels: bool = False) -> SectionStack | Hdf5Dataset:
    path = Path(spec.partition(":")[0])
    if path.suffix.lower() in HDF5_SUFFIXES:
        return Hdf5Dataset(spec, labels)
    if not path.exists():
        raise UserError(f"source: {spec} does not exist")
    if path.is_dir() or path.suffix.lower() in (".tif", ".tiff"):
        return SectionStack(path, labels)
    raise UserError(f"source: {spec} is neither a section directory, a TIFF stack nor FILE.h5:/dataset")


class BodyMap:
    """Supervoxel -> body look-up, vectorised with a sorted key array."""

    def __init__(self, spec: str):
        import h5py

        path, dataset = _split_hdf5(spec)
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise UserError(f"--body-map: dataset {dataset!r} not found in {path}")
            table = np.asarray(f[dataset])
        if table.ndim != 2 or table.shape[1] != 2:
            raise UserError(f"--body-map: {spec} must be an (N, 2) table of [supervoxel, body]")
        order = np.argsort(table[:, 0])
        self.keys = table[order, 0].astype(np.uint64)
        self.values = table[order, 1].astype(np.uint64)

    def __call__(self, supervoxels: np.ndarray) -> np.ndarray:
        return apply_mapping(supervoxels.astype(np.uint64), self.keys, self.values)


def section_components(sections: np.ndarray, first_id: int) -> tuple[np.ndarray, int]:
    """Per section, the 4-connected components of the non-zero pixels,
    numbered from `first_id + 1`. Returns (labels, last id used)."""
    from scipy import ndimage

    labels = np.zeros(sections.shape, dtype=np.uint64)
    for z, section in enumerate(sections):
        components, n = ndimage.label(section != 0)
        labels[z] = np.where(components > 0, components.astype(np.uint64) + np.uint64(first_id), 0)
        first_id += n
    return labels, first_id


def instance_keys(data: np.ndarray, first_section: int, per_section: bool) -> np.ndarray:
    """What names an instance: its id, or (section, id) as one uint64."""
    if not per_section:
        return data.astype(np.uint64)
    if data.size and int(data.max()) >= 2**32:
        raise UserError("--ids-per-section: ids must be below 2^32")
    sections = np.arange(first_section, first_section + data.shape[0], dtype=np.uint64).reshape(-1, *(1,) * (data.ndim - 1))
    return np.where(data != 0, (sections << np.uint64(32)) | data.astype(np.uint64), 0)


def choose_instances(ids: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """`keep` >= 1: that many ids; below 1: that fraction (at least one)."""
    count = int(keep) if keep >= 1 else max(1, round(keep * len(ids)))
    if count > len(ids):
        raise UserError(f"--keep-instances: {count} instances asked for, the labels hold {len(ids)}")
    return np.sort(np.random.default_rng(seed).choice(ids, size=count, replace=False))


# intensities sampled per slab to find the percentiles: enough for a
# percentile to within a grey level, a bounded pass over any volume
SAMPLES_PER_SLAB = 1_000_000


def intensity_range(src, z0: int, steps: list[tuple[int, int]], percentiles: tuple[float, float]) -> np.ndarray:
    """Per channel, the intensities at the two percentiles, from an evenly
    strided sample of every slab (a first pass over the source): (low,
    high), or (channels, 2) rows for a multi-channel source, whose stains
    differ in brightness."""
    channels = src.channels or 1
    samples = [[] for _ in range(channels)]
    for a, b in steps:
        data = np.asarray(src.read(z0 + a, z0 + b)).reshape(channels, -1)
        for c in range(channels):
            samples[c].append(data[c, :: max(1, data.shape[1] // SAMPLES_PER_SLAB)].astype(np.float64))
    ranges = []
    for c in range(channels):
        values = np.concatenate(samples[c])
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise UserError("source: holds no finite intensity")
        low, high = np.percentile(values, percentiles)
        if high <= low:
            raise UserError(f"--percentiles: the source's intensities at {percentiles[0]:g} and {percentiles[1]:g} are "
                            f"both {low:g}{f' in channel {c}' if src.channels else ''}; widen the percentiles")
        ranges.append((float(low), float(high)))
    return np.array(ranges) if src.channels else np.array(ranges[0])


def to_uint8(data: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """`intensity_range`'s ranges applied: channel by channel (axis 0) for
    rows of them."""
    shape = (-1,) + (1,) * (data.ndim - 1) if ranges.ndim == 2 else ()
    low, high = ranges[..., 0].reshape(shape), ranges[..., 1].reshape(shape)
    scaled = (np.nan_to_num(data.astype(np.float64), nan=0.0) - low) / (high - low)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def slabs(depth: int, step: int) -> Iterator[tuple[int, int]]:
    for z0 in range(0, depth, step):
        yield z0, min(depth, z0 + step)


def ingest(
    source: str,
    out: str,
    voxel_size: tuple[int, int, int],
    offset: tuple[int, int, int] = (0, 0, 0),
    z_range: tuple[int, int] | None = None,
    body_map: str | None = None,
    chunk_shape: tuple[int, int, int] = (64, 64, 64),
    components: bool = False,
    keep_instances: float | None = None,
    seed: int = 0,
    annotation_mask: str | None = None,
    ids_per_section: bool = False,
    overwrite: bool = False,
    labels: bool = False,
    percentiles: tuple[float, float] | None = None,
) -> None:
    for name, values in (("--voxel-size", voxel_size), ("--chunk-shape", chunk_shape)):
        if any(v <= 0 for v in values):
            raise UserError(f"{name}: every value must be positive, got {' '.join(map(str, values))}")
    labels = labels or body_map is not None or components or keep_instances is not None
    if labels and percentiles is not None:
        raise UserError("--percentiles maps image intensities; labels keep their ids")
    if percentiles is not None and not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise UserError(f"--percentiles: need 0 <= LOW < HIGH <= 100, got {percentiles[0]:g} {percentiles[1]:g}")
    src = open_source(source, labels)
    z0, z1 = z_range if z_range is not None else (0, src.shape[0])
    if not 0 <= z0 < z1 <= src.shape[0]:
        raise UserError(f"--z-range: {z0}..{z1} is outside the source's {src.shape[0]} sections")
    if keep_instances is not None and keep_instances <= 0:
        raise UserError(f"--keep-instances: must be positive, got {keep_instances}")
    if keep_instances is None and (annotation_mask is not None or ids_per_section):
        raise UserError(f"{'--annotation-mask' if annotation_mask is not None else '--ids-per-section'} "
                        f"belongs to --keep-instances (a sparse copy)")
    mapping = BodyMap(body_map) if body_map else None
    if labels:
        if not np.issubdtype(src.dtype, np.integer):
            raise UserError(f"source: labels must be integer ids, {source} holds {src.dtype.name}")
        dtype = "uint64" if mapping is not None or components or keep_instances is not None else src.dtype.name
    else:
        # raw is 8-bit: the networks see [0, 1] as 0..255
        dtype = "uint8"
        if src.dtype != np.uint8 and percentiles is None:
            raise UserError(
                f"source: {source} holds {src.dtype.name} intensities and affseg's raw is 8-bit: pass --percentiles "
                f"0.1 99.9 to map that range of intensities to 0..255 (recorded in the dataset's attributes), "
                f"or --labels if it holds instance ids"
            )
    vs = Coordinate(voxel_size)
    shape = Coordinate((z1 - z0, *src.shape[1:]))
    roi = Roi(Coordinate(offset), shape * vs)
    try:
        container, dataset = split_path(out)
    except ValueError as e:
        raise UserError(f"--out: {e}") from e
    outputs = [(container, dataset)]
    if annotation_mask is not None:
        try:
            outputs.append(split_path(annotation_mask))
        except ValueError as e:
            raise UserError(f"--annotation-mask: {e}") from e
        if outputs[1] == outputs[0]:
            raise UserError("--annotation-mask: must be another dataset than --out")
    for (where, name), flag in zip(outputs, ("--out", "--annotation-mask")):
        if (where / name).exists():
            if not overwrite:
                raise UserError(f"{flag}: {where / name} exists already; pass --overwrite to replace it")
            shutil.rmtree(where / name)
        where.mkdir(parents=True, exist_ok=True)
    chunks = Coordinate(min(c, s) for c, s in zip(chunk_shape, shape))
    steps = list(slabs(z1 - z0, chunks[0]))

    intensity = None
    if percentiles is not None:
        intensity = intensity_range(src, z0, steps, percentiles)

    def converted() -> Iterator[tuple[int, int, np.ndarray]]:
        last_id = 0
        for a, b in steps:
            data = src.read(z0 + a, z0 + b)
            if intensity is not None:
                data = to_uint8(data, intensity)
            if mapping is not None:
                data = mapping(data)
            if components:
                data, last_id = section_components(data, last_id)
            yield a, b, data

    kept = None
    if keep_instances is not None:
        ids = np.unique(np.concatenate([np.unique(instance_keys(data, a, ids_per_section)) for a, _, data in converted()]))
        kept = choose_instances(ids[ids != 0], keep_instances, seed)
    array = prepare_volume(container, dataset, roi, vs, dtype, chunks * vs, channels=src.channels)
    mask = None
    if annotation_mask is not None:
        mask = prepare_volume(*outputs[1], roi, vs, "uint8", chunks * vs)
    try:
        # no bar where stderr is no terminal (a log, a test): one line per error
        for a, b, data in tqdm(converted(), total=len(steps), desc=f"ingest {dataset}", unit="slab", disable=None):
            slab = Roi(roi.offset + Coordinate(a, 0, 0) * vs, Coordinate(b - a, *shape[1:]) * vs)
            if kept is not None:
                keep = np.isin(instance_keys(data, a, ids_per_section), kept)
                if mask is not None:  # the kept instances and the known background
                    mask[slab] = (keep | (data == 0)).astype(np.uint8)
                data = np.where(keep, data, 0)
            array[slab] = data.astype(dtype)
    except UserError:
        # a section found unreadable halfway: no half-written dataset
        for where, name in outputs:
            shutil.rmtree(where / name, ignore_errors=True)
        raise
    note = f"; kept {len(kept)} of {len(ids) - (ids[0] == 0)} instances (seed {seed})" if kept is not None else ""
    if mask is not None:
        note += f"; annotation mask {outputs[1][0]}/{outputs[1][1]} (kept instances and background)"
    if intensity is not None:
        # one (low, high) range, or one per channel
        record = {"source_dtype": src.dtype.name, "percentiles": list(percentiles), "range": intensity.tolist(),
                  "uint8": "round(clip((x - low) / (high - low), 0, 1) * 255)"}
        zarr.open_array(str(container / dataset), mode="r+").attrs["intensity_mapping"] = record
        note += (f"; {src.dtype.name} intensities {intensity.tolist()} (percentiles {percentiles[0]:g}, "
                 f"{percentiles[1]:g}) mapped to 0..255")
    channels = f"{src.channels} channels x " if src.channels else ""
    print(f"wrote {container}/{dataset}: shape {channels}{tuple(shape)}, {dtype}, voxel size {tuple(vs)}, offset {tuple(offset)}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python pipeline/ingest.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="section directory, TIFF stack or FILE.h5:/dataset")
    parser.add_argument("--out", required=True, help="CONTAINER.zarr/DATASET to write")
    parser.add_argument("--voxel-size", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"), help="world units (nm) per voxel")
    parser.add_argument("--offset", type=int, nargs=3, default=(0, 0, 0), metavar=("Z", "Y", "X"), help="world offset of the first voxel (default 0 0 0)")
    parser.add_argument("--z-range", type=int, nargs=2, metavar=("BEGIN", "END"), help="only sections BEGIN..END-1")
    parser.add_argument("--body-map", help="FILE.h5:/table of [supervoxel, body] rows to apply to labels")
    parser.add_argument("--chunk-shape", type=int, nargs=3, default=(64, 64, 64), metavar=("Z", "Y", "X"), help="zarr chunk shape in voxels (default 64 64 64)")
    parser.add_argument("--components", action="store_true", help="label the connected components of each section's non-zero pixels (boundary masks -> instances)")
    parser.add_argument("--keep-instances", type=float, metavar="K", help="sparse copy: keep K random whole instances (K < 1: that fraction)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --keep-instances (default 0)")
    parser.add_argument("--annotation-mask", metavar="CONTAINER.zarr/DATASET",
                        help="with --keep-instances: also write the annotation mask (1 = kept instances and background, "
                             "0 = the other instances), for data whose label 0 is known background")
    parser.add_argument("--ids-per-section", action="store_true",
                        help="with --keep-instances: ids restart in every section (independent 2D images); an instance "
                             "is a section's id")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    parser.add_argument("--labels", action="store_true", help="the source holds instance ids (kept as they are; palette PNGs give their indices)")
    parser.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="map a 16-bit or float image to uint8: the intensities at these percentiles become 0 and 255")
    args = parser.parse_args()
    ingest(
        args.source,
        args.out,
        tuple(args.voxel_size),
        tuple(args.offset),
        tuple(args.z_range) if args.z_range else None,
        args.body_map,
        tuple(args.chunk_shape),
        args.components,
        args.keep_instances,
        args.seed,
        args.annotation_mask,
        args.ids_per_section,
        args.overwrite,
        args.labels,
        tuple(args.percentiles) if args.percentiles else None,
    )


if __name__ == "__main__":
    cli_main(main)
