"""Block geometry of a run, checked against the data, and the run directory.

`RunLayout` is computed once from the config, the raw volume and the model:
ROIs, block shapes and the fragment-id arithmetic that every worker shares.
The run directory records it in `layout.json`, with the model's digest and
the block steps' settings (`run_record`); a later run of the same directory
with any of them changed is refused, because finished blocks made the old
way would silently mix with new ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from funlib.geometry import Coordinate, Roi

from pipeline.config import PartitionName, RunConfig, default_partition, offsets_error
from pipeline.errors import UserError
from pipeline.storage.files import write_atomically
from pipeline.storage.graph_store import GraphStore, open_store
from pipeline.storage.volumes import (
    AFFINITY_DTYPES,
    RAW_DTYPE_HINT,
    ChunkFiles,
    MissingChunks,
    VolumeReadError,
    holds_nonzero,
    open_volume,
    read_affinities,
    read_roi,
    read_uncertainty,
    split_path,
)

if TYPE_CHECKING:
    from pipeline.orchestration.partitioners import Partitioner

RAW_DTYPES = ("uint8",)
LABEL_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int32", "int64")
MAX_ID = 2**53


def load_network(config: RunConfig):
    """The run's model (a `pipeline.methods.base.MethodModel`)."""
    from pipeline.methods import baseline, load_model

    if config.model.baseline is not None:
        network = baseline(config.model.baseline)
    elif not Path(config.model.checkpoint).exists():
        raise UserError(f"model.checkpoint: {config.model.checkpoint} does not exist")
    else:
        try:
            network = load_model(config.model.checkpoint)
        except ValueError as e:
            raise UserError(f"model.checkpoint: {e}") from e
    chosen = config.model.representation
    if chosen is not None:
        if chosen not in network.representations:
            offered = (f"this model offers {list(network.representations)}" if network.representations else
                       "this model gives its affinities one way and has none to choose")
            raise UserError(f"model.representation: {chosen!r} is not a representation of the model; {offered}")
        network.representation = chosen
    return network


# block-wise steps redone whole on every run of the job, without done markers
REDONE_STEPS = ("proofread", "evaluate")


@dataclass(frozen=True)
class RunLayout:
    voxel_size: Coordinate
    roi: Roi  # the volume to segment, world units
    offsets: tuple[tuple[int, int, int], ...]  # the affinities the run predicts
    predict_output: Coordinate  # world units
    predict_context: Coordinate  # world units, per side
    block_shape: Coordinate  # world units
    context: Coordinate  # world units, per side
    # how the volume is partitioned after predict (RunConfig.partition,
    # resolved): a key of pipeline/orchestration/partitioners.PARTITIONERS
    partition: PartitionName
    # outputs computed beyond a predict block on each side, world units: an
    # embedding's affinities need the partner's embedding
    predict_margin: Coordinate = Coordinate(0, 0, 0)
    # the model's datasets the run has besides `affs`: (name, channels,
    # dtype); the predict step writes them, or they are given with given
    # affinities (AffinitiesConfig.outputs)
    extras: tuple[tuple[str, int, str], ...] = ()
    # False for given affinities (RunConfig.affinities): no predict step, and
    # the predict_* fields are unused
    predicted: bool = True
    # which representation of a model with several gives the affinities
    # (CRAC: embedding or explicit); None for the others. In the run
    # record, so one run directory never mixes blocks of both
    representation: str | None = None

    @property
    def predict_read_context(self) -> Coordinate:
        """Raw read around a predict block, per side: the margin of outputs
        beyond the block, and the network's own context around those."""
        return self.predict_margin + self.predict_context

    @property
    def block_grid(self) -> Coordinate:
        return Coordinate(-(-s // b) for s, b in zip(self.roi.shape, self.block_shape))

    @property
    def partitioner(self) -> Partitioner:
        # imported here: the partitioners build daisy tasks on this module
        from pipeline.orchestration.partitioners import PARTITIONERS

        return PARTITIONERS[self.partition]

    def steps(self, evaluated: bool) -> tuple[str, ...]:
        """The run's steps, in order (the master's steps included); the
        proofreading list for a model with an uncertainty; evaluate only
        when `evaluated` (the config names ground truth)."""
        first = ("predict",) if self.predicted else ()
        last = ("proofread",) * self.uncertain + ("evaluate",) * evaluated
        return (*first, *self.partitioner.steps, *last)

    @property
    def uncertain(self) -> bool:
        """Whether the run has a model's uncertainty (predicted or given)."""
        return any(name == "uncertainty" for name, _, _ in self.extras)

    @property
    def block_steps(self) -> tuple[str, ...]:
        """The steps daisy runs block by block and resumes by done markers
        (proofread and evaluate, redone whole each time, are not among them)."""
        return tuple(step for step in self.steps(evaluated=False)
                     if step not in self.partitioner.master_steps and step not in REDONE_STEPS)

    @property
    def voxels_per_block(self) -> int:
        return int(np.prod(self.block_shape / self.voxel_size))

    def block_index(self, write_roi: Roi) -> int:
        """Row-major index of a post-processing block in the grid over `roi`."""
        position = (write_roi.offset - self.roi.offset) / self.block_shape
        return int(np.ravel_multi_index(tuple(position), tuple(self.block_grid)))

    def first_id(self, index: int) -> int:
        """Fragment (and 2D segment) ids of block `index` are
        `first_id(index) + local_id` with local ids from 1."""
        return index * self.voxels_per_block

    def window(self, inner: Roi, outer: Roi) -> tuple[slice, ...]:
        """Voxel slices of `inner` within an array that holds `outer`."""
        return ((inner - outer.begin) / self.voxel_size).to_slices()

    def blocks_meeting(self, roi: Roi) -> Iterator[tuple[int, Roi]]:
        """(index, write ROI) of every post-processing block whose write ROI
        meets `roi`, by increasing index."""
        # numpy's floor division: Coordinate's `/` truncates towards zero
        begin = np.subtract(roi.begin, self.roi.begin)
        start = begin // self.block_shape
        end = -(-(begin + np.array(roi.shape)) // self.block_shape)
        ranges = [range(max(0, int(s)), min(g, int(e))) for s, e, g in zip(start, end, self.block_grid)]
        for position in itertools.product(*ranges):
            cell = Roi(self.roi.begin + Coordinate(position) * self.block_shape, self.block_shape)
            yield self.block_index(cell), cell.intersect(self.roi)

    def block_of_fragment(self, ids: np.ndarray) -> np.ndarray:
        """The inverse of `first_id`: the block is recovered without a look-up."""
        return ((ids.astype(np.uint64) - 1) // np.uint64(self.voxels_per_block)).astype(np.int64)

    def to_json(self) -> dict:
        return {
            "voxel_size": list(self.voxel_size),
            "roi": {"offset": list(self.roi.offset), "shape": list(self.roi.shape)},
            "offsets": [list(o) for o in self.offsets],
            # before the settings it reads (run_record), so a refusal names it
            "partition": self.partition,
            # before the keys it changes (margin, extras), so a refusal names it
            "representation": self.representation,
            "predict_output": list(self.predict_output),
            "predict_context": list(self.predict_context),
            "block_shape": list(self.block_shape),
            "context": list(self.context),
            "predict_margin": list(self.predict_margin),
            "extras": [list(e) for e in self.extras],
            "predicted": self.predicted,
        }

    @classmethod
    def from_json(cls, data: dict) -> RunLayout:
        return cls(
            voxel_size=Coordinate(data["voxel_size"]),
            roi=Roi(data["roi"]["offset"], data["roi"]["shape"]),
            offsets=tuple(tuple(o) for o in data["offsets"]),
            predict_output=Coordinate(data["predict_output"]),
            predict_context=Coordinate(data["predict_context"]),
            block_shape=Coordinate(data["block_shape"]),
            context=Coordinate(data["context"]),
            partition=data["partition"],
            predict_margin=Coordinate(data["predict_margin"]),
            extras=tuple(tuple(e) for e in data["extras"]),
            predicted=data["predicted"],
            # run directories from before representations have none
            representation=data.get("representation"),
        )

    @classmethod
    def from_config(cls, config: RunConfig, network=None) -> RunLayout:
        raw = open_volume(*split_path(config.raw), field="raw", dtypes=RAW_DTYPES, dtype_hint=RAW_DTYPE_HINT)
        if raw.voxel_size.dims != 3 or raw.channel_dims > 1:
            raise UserError(f"raw: expected a 3D (z, y, x) volume, or (c, z, y, x) with a channel axis, got shape {raw.shape}")
        vs = raw.voxel_size
        if any(o % v for o, v in zip(raw.roi.offset, vs)):
            raise UserError(f"raw: its offset {tuple(raw.roi.offset)} is not a multiple of its voxel size {tuple(vs)}")
        roi = raw.roi
        if config.roi is not None:
            roi = Roi(config.roi.offset, config.roi.shape)
            if not roi.snap_to_grid(vs) == roi:
                raise UserError(f"roi: {roi} is not a multiple of the voxel size {tuple(vs)}")
            if not raw.roi.contains(roi):
                raise UserError(f"roi: {roi} is not inside the raw volume {raw.roi}")
        if config.raw_missing_chunks == "error":
            check_complete(raw, roi, "raw", "; if the volume is sparse on purpose, set raw_missing_chunks: \"empty\"")
        if config.ground_truth:
            check_ground_truth(config.ground_truth, vs, roi)

        pp = config.postprocess
        for name, value in (("block_shape", pp.block_shape), ("context", pp.context)):
            if any(v % s for v, s in zip(value, vs)):
                raise UserError(f"postprocess.{name}: {list(value)} is not a multiple of the voxel size {list(vs)}")
        block_shape = Coordinate(pp.block_shape)
        if any(r < b for r, b in zip(roi.shape, block_shape)):
            raise UserError(
                f"postprocess.block_shape: the volume {list(roi.shape)} is smaller than one block "
                f"{list(block_shape)}; use a smaller block"
            )

        if config.affinities is not None:
            offsets = tuple(tuple(int(x) for x in o) for o in config.affinities.offsets)
            error = offsets_error(offsets)
            if error:
                raise UserError(f"affinities.offsets: {error}")
            _check_given_affinities(config, len(offsets), vs, roi)
            given = _check_given_outputs(config, offsets, vs, roi)
        else:
            network = network if network is not None else load_network(config)
            channels = raw.shape[0] if raw.channel_dims else 1
            if network.in_channels != channels:
                raise UserError(f"model: it reads {network.in_channels}-channel raw, and raw has {channels} "
                                f"channel(s) (shape {raw.shape})")
            offsets = tuple(tuple(int(x) for x in o) for o in (config.model.offsets or network.offsets))
            for error in (network.offsets_error(offsets), offsets_error(offsets)):
                if error:
                    raise UserError(f"model.offsets: {error}")
        from pipeline.orchestration.partitioners import PARTITIONERS  # see `partitioner`

        partition = config.partition or default_partition(offsets)
        partitioner = PARTITIONERS[partition]
        unfit = partitioner.unfit(config, offsets)
        if unfit:
            raise UserError(f"partition: {unfit}")
        partitioner.check_geometry(config, offsets, roi, block_shape, vs)
        if config.affinities is not None:
            zero = Coordinate(0, 0, 0)
            layout = cls(vs, roi, offsets, predict_output=block_shape, predict_context=zero, block_shape=block_shape,
                         context=Coordinate(pp.context), partition=partition, extras=given, predicted=False)
        else:
            layout = cls._predicted(config, network, vs, roi, offsets, block_shape, partition)
        if int(np.prod(layout.block_grid)) * layout.voxels_per_block >= MAX_ID:
            raise UserError("postprocess.block_shape: the volume has too many voxels for fragment ids below 2^53")
        return layout

    @classmethod
    def _predicted(cls, config: RunConfig, network, vs: Coordinate, roi: Roi, offsets, block_shape: Coordinate,
                   partition: PartitionName) -> RunLayout:
        """The predict step's geometry: the network's shapes and context."""
        available = network.outputs(offsets)
        unknown = [name for name in config.predict.extra_outputs if name not in available]
        if unknown:
            raise UserError(f"predict.extra_outputs: this model has no output {unknown[0]!r}; it has {sorted(available)}")
        wanted = set(config.predict.extra_outputs) | set(network.needed_outputs())
        geometry = network.geometry
        # whole steps of the network's alignment, so blocks stay on its grid
        margin = Coordinate(-(-r // a) * a for r, a in zip(network.reach(offsets), geometry.alignment))
        try:
            output = Coordinate(geometry.valid_output_shape(Coordinate(config.predict.output_shape) + margin * 2))
        except ValueError as e:
            raise UserError(f"model: {e}") from e
        context = Coordinate(geometry.context)
        if any(c % 2 for c in context):
            raise UserError("model: the network's context is not symmetric")
        return cls(
            voxel_size=vs,
            roi=roi,
            offsets=offsets,
            predict_output=(output - margin * 2) * vs,
            predict_context=context / 2 * vs,
            block_shape=block_shape,
            context=Coordinate(config.postprocess.context),
            partition=partition,
            predict_margin=margin * vs,
            extras=tuple((name, *available[name]) for name in sorted(wanted)),
            representation=network.representation,
        )


def _check_given_affinities(config: RunConfig, channels: int, vs: Coordinate, roi: Roi) -> None:
    path = config.affinities.dataset
    affs = open_volume(*split_path(path), field="affinities", dtypes=AFFINITY_DTYPES)
    if len(affs.shape) != 4 or affs.shape[0] != channels:
        raise UserError(
            f"affinities: expected a 4D (offset, z, y, x) dataset with one channel per offset ({channels}), "
            f"got shape {affs.shape}"
        )
    _check_covers(affs, "affinities", vs, roi)
    check_complete(affs, roi, "affinities")
    # the values where the identity samples them; every block checks its own
    for sample in sample_rois(affs):
        try:
            read_affinities(affs, sample, path)
        except VolumeReadError as e:
            raise UserError(f"affinities: {e}") from e


def _given_output_format(name: str, offsets) -> tuple[int, str]:
    """(channels, dtype) of a model output the steps read, as the predict
    step writes it (MethodModel.outputs): what a given one must be."""
    return {"foreground": (1, "uint8"), "uncertainty": (len(offsets), "float16")}[name]


def _check_given_outputs(config: RunConfig, offsets, vs: Coordinate, roi: Roi) -> tuple[tuple[str, int, str], ...]:
    """The given affinities' other outputs, checked as the affinities are:
    the run's extras."""
    extras = []
    for name, path in sorted(config.affinities.outputs.items()):
        field = f"affinities.outputs.{name}"
        channels, dtype = _given_output_format(name, offsets)
        volume = open_volume(*split_path(path), field=field, dtypes=(dtype,))
        if len(volume.shape) != 4 or volume.shape[0] != channels:
            raise UserError(f"{field}: expected a 4D (channel, z, y, x) dataset with {channels} channel(s), got shape "
                            f"{volume.shape}")
        _check_covers(volume, field, vs, roi)
        check_complete(volume, roi, field)
        if name == "uncertainty":
            for sample in sample_rois(volume):
                try:
                    read_uncertainty(volume, sample, path)
                except VolumeReadError as e:
                    raise UserError(f"{field}: {e}") from e
        extras.append((name, channels, dtype))
    return tuple(extras)


def check_complete(volume, roi: Roi, field: str, hint: str = "") -> None:
    """Refuse an input volume with a chunk file missing inside `roi`: zarr
    would read it as zeros without a word (one listing, ChunkFiles)."""
    files = ChunkFiles.of(volume)
    absent = files.first_unlisted(roi)
    if absent is not None:
        raise UserError(
            f"{field}: chunk {files.directory / absent} is missing (an incomplete copy?), and zarr would read it "
            f"as zeros{hint}"
        )


def check_ground_truth(path: str, vs: Coordinate, roi: Roi) -> None:
    """What predict.py and evaluate.py both check before any work: a 3D
    label volume on raw's grid, covering the ROI, complete, and labelling
    something there (scores of an all-zero ground truth do not exist)."""
    gt = open_volume(*split_path(path), field="ground_truth", dtypes=LABEL_DTYPES)
    if len(gt.shape) != 3:
        raise UserError(f"ground_truth: expected a 3D (z, y, x) label volume, got shape {gt.shape}")
    _check_covers(gt, "ground_truth", vs, roi)
    check_complete(gt, roi, "ground_truth")
    try:
        labelled = holds_nonzero(gt, roi, path)
    except VolumeReadError as e:
        raise UserError(f"ground_truth: {e}") from e
    if not labelled:
        raise UserError(f"ground_truth: {path} labels no voxel inside the run's ROI {roi}; there is nothing to score against")


def _check_covers(volume, field: str, vs: Coordinate, roi: Roi) -> None:
    """A volume read beside raw: on raw's voxel grid, and covering the run's ROI."""
    if any(o % v for o, v in zip(volume.roi.offset, volume.voxel_size)):
        raise UserError(
            f"{field}: its offset {tuple(volume.roi.offset)} is not a multiple of its voxel size {tuple(volume.voxel_size)}"
        )
    if volume.voxel_size != vs:
        raise UserError(f"{field}: voxel size {tuple(volume.voxel_size)} differs from raw's {tuple(vs)}")
    if not volume.roi.contains(roi):
        raise UserError(f"{field}: its ROI {volume.roi} does not cover the run's {roi}")


def prediction_path(config: RunConfig, run_dir: RunDir, name: str = "affs") -> Path:
    """Where the run's affinities ("affs") or another of the model's outputs
    (the layout's extras) are: given with the affinities, or the predict
    step's."""
    if config.affinities is not None:
        return Path(config.affinities.dataset if name == "affs" else config.affinities.outputs[name])
    return run_dir.volumes / name


@dataclass(frozen=True)
class RunDir:
    """Where a run keeps everything; one place, so workers and status agree."""

    path: Path

    volumes = property(lambda self: self.path / "volumes.zarr")
    config = property(lambda self: self.path / "config.json")
    layout = property(lambda self: self.path / "layout.json")
    progress = property(lambda self: self.path / "progress.jsonl")
    report = property(lambda self: self.path / "report.json")
    logs = property(lambda self: self.path / "logs")
    # which look-up table the segmentation volume holds (or is being
    # relabelled to): relabel's done markers are only valid for that one
    relabel_target = property(lambda self: self.path / "segmentation.json")
    master_lock = property(lambda self: self.path / "master.lock")
    # one file per evaluate block: its contingency tables (evaluate.py)
    evaluation = property(lambda self: self.path / "evaluation")
    # the ground truth and thresholds of the evaluation in progress
    evaluation_target = property(lambda self: self.path / "evaluation" / "target.json")
    # the proofreading list of a model with an uncertainty (pipeline/proofreading.py)
    proofreading = property(lambda self: self.path / "proofreading")

    def tracking(self, step: str) -> Path:
        return self.path / "tracking" / step

    def lut(self, key: str) -> Path:
        """A look-up table by the key its partitioner gives it (for waterz
        SCORING/THRESHOLD, e.g. "hist_quant_50/0.5")."""
        return self.path / "luts" / f"{key}.npy"

    def recorded(self) -> dict | None:
        """The run record in `layout.json` (None for a new directory)."""
        if not self.layout.exists():
            return None
        try:
            record = json.loads(self.layout.read_text())
            if "partition" not in record:
                # a directory from before the partition choice: its
                # partitioner followed from the offsets, as the default does
                record["partition"] = default_partition(record["offsets"])
            RunLayout.from_json(record)
            record["run_id"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"run_dir: {self.layout} is damaged or from an older affseg ({type(e).__name__}: {e}); "
                f"delete the run directory to start again"
            ) from e
        return record

    def read_layout(self) -> RunLayout:
        record = self.recorded()
        if record is None:
            raise UserError(f"run_dir: {self.path} holds no run (no layout.json); run pipeline/predict.py first")
        return RunLayout.from_json(record)

    def run_id(self) -> str | None:
        """The id made when the directory was claimed (None before): it
        names the run's default MongoDB database and its owner record."""
        record = self.recorded()
        return None if record is None else record["run_id"]

    def check_writable(self) -> None:
        """One line for a run_dir that cannot hold a run: a file, or a
        directory (or the parent it would be made in) this process cannot
        write, as on a read-only file system."""
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"run_dir: {existing} is a file, not a directory")
        try:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".affseg-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"run_dir: cannot write in {existing}: {e.strerror}") from e

    def changed_key(self, record: dict) -> str | None:
        """The first key in which `record` differs from the directory's
        recorded `run_record`; None for a new directory or an equal record."""
        existing = self.recorded()
        if existing is None:
            return None
        return next((key for key in record if existing.get(key) != record[key]), None)


def run_store(config: RunConfig, run_dir: RunDir, run_id: str | None = None,
              first_contact_s: float | None = None) -> GraphStore:
    """The run's graph store; `run_id` before the directory records one.
    `first_contact_s`: see open_store."""
    return open_store(config.store, run_dir.path, run_id or run_dir.run_id(), config.store_password_file,
                      config.store_timeout_s, first_contact_s)


def model_identity(config: RunConfig) -> str | dict:
    """The baseline's name, or a digest of the checkpoint's bytes (a model
    retrained into the same file is another model), or the identity of the
    given affinities."""
    if config.affinities is not None:
        given = {name: volume_identity(path, f"affinities.outputs.{name}")
                 for name, path in sorted(config.affinities.outputs.items())}
        return {"affinities": volume_identity(config.affinities.dataset, "affinities"), **given}
    if config.model.baseline is not None:
        return f"baseline {config.model.baseline}"
    digest = hashlib.sha256()
    with open(config.model.checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256 {digest.hexdigest()}"


# voxels per side of the cubes `volume_identity` reads at the corners and centre
DIGEST_CUBE = 16


def volume_identity(path: str, field: str, missing: MissingChunks = "error") -> dict:
    """What identifies a volume (raw, given affinities): its path, geometry,
    a digest of nine small cubes (the ROI's corners and centre, all
    channels), which tells apart another volume with the same geometry, and
    a digest of its chunk files' names, sizes and modification times, which
    finds a chunk rewritten in place anywhere (README, "Crashes, resume":
    its cost on a Kasthuri15-sized volume)."""
    volume = open_volume(*split_path(path), field=field)
    digest = hashlib.sha256()
    for sample in sample_rois(volume):
        try:
            digest.update(np.ascontiguousarray(read_roi(volume, sample, path, missing=missing)).tobytes())
        except VolumeReadError as e:
            raise UserError(f"{field}: {e}") from e
    return {
        "path": path,
        "shape": list(volume.shape),
        "dtype": volume.dtype.name,
        "voxel_size": list(volume.voxel_size),
        "offset": list(volume.roi.offset),
        "sample_sha256": digest.hexdigest(),
        "chunks_sha256": ChunkFiles.of(volume).listing_digest(),
    }


def sample_rois(volume) -> list[Roi]:
    """Nine small cubes (DIGEST_CUBE voxels a side) of a volume: its
    ROI's corners and centre."""
    vs = volume.voxel_size
    cube = Coordinate(min(DIGEST_CUBE * v, s) for v, s in zip(vs, volume.roi.shape))
    room = volume.roi.shape - cube
    corners = [*itertools.product(*((0, r) for r in room)), room / vs / 2 * vs]
    return [Roi(volume.roi.begin + Coordinate(corner), cube) for corner in corners]


def run_record(layout: RunLayout, config: RunConfig) -> dict:
    """Everything the stored block results depend on: the layout, the raw
    volume, the store, the model and the settings of the chosen
    partitioner's steps (Partitioner.record)."""
    return {
        **layout.to_json(),
        "raw": volume_identity(config.raw, "raw", config.raw_missing_chunks),
        "raw_missing_chunks": config.raw_missing_chunks,
        "store": config.store,
        "model": model_identity(config),
        "predict_outside": config.predict.outside,
        **layout.partitioner.record(config),
    }


def check_run_dir(run_dir: RunDir, record: dict) -> None:
    """Refuse a directory whose `run_record` differs: finished blocks made
    with other inputs would silently mix with new ones. Writes nothing."""
    key = run_dir.changed_key(record)
    if key == "raw" and "chunks_sha256" not in run_dir.recorded()["raw"]:
        raise UserError(
            f"run_dir {run_dir.path} was made by an earlier affseg, which did not record raw's chunk files and "
            f"cannot prove its blocks are of this raw volume: delete it (or use a new run_dir) to start again"
        )
    if key is not None:
        existing = run_dir.recorded().get(key)
        raise UserError(
            f"run_dir {run_dir.path} was made with {key} = {json.dumps(existing)}, this config gives "
            f"{json.dumps(record[key])}; a run's finished blocks depend on it, so changing it is refused: "
            f"use a new run_dir, or delete this one"
        )


def claim_run_dir(run_dir: RunDir, record: dict, run_id: str) -> bool:
    """Create or re-open a run directory. Returns True for a fresh run,
    whose `layout.json` now holds `record` and `run_id`."""
    check_run_dir(run_dir, record)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if run_dir.layout.exists():
        return False
    write_atomically(run_dir.layout, json.dumps({**record, "run_id": run_id}, indent=2))
    return True
