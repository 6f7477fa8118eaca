"""The gunpowder pipeline that feeds training: sources, augmentations and
targets, up to (not including) the torch node.

    sources (one per volume: raw, labels, annotation mask; Normalize; Pad;
             AnnotatedLocation: RandomLocation, rejecting poorly annotated
             locations, refusing a share no location reaches)
    -> RandomProvider -> ElasticAugment (rotation, slips, shifts)
    -> SimpleAugment (mirror; transpose between axes of equal voxel size)
    -> IntensityAugment -> DefectAugment (blank, low-contrast, artifact
       sections; artifacts come from a source of their own) -> GrowBoundary
    -> AddAffinities (with the annotation mask) -> Unsqueeze
    -> Stack (batch_size samples)

The training loop (`loop.py`) requests from it; kept apart so tests can
request batches from exactly the pipeline that training uses.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import gunpowder as gp
import numpy as np
from funlib.geometry import Coordinate, Roi

from pipeline.training.config import ArtifactConfig, AugmentConfig, TrainConfig, TrainVolume
from pipeline.errors import UserError
from pipeline.orchestration.run_layout import check_complete
from pipeline.storage.volumes import RAW_DTYPE_HINT, VolumeReadError, holds_nonzero, open_volume, split_path

LABEL_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int32", "int64")


@dataclass(frozen=True)
class TrainingKeys:
    raw: gp.ArrayKey = gp.ArrayKey("RAW")
    labels: gp.ArrayKey = gp.ArrayKey("LABELS")
    labels_mask: gp.ArrayKey = gp.ArrayKey("LABELS_MASK")
    # voxels of annotated instances, which sparse sampling looks for
    instances: gp.ArrayKey = gp.ArrayKey("INSTANCES")
    affs: gp.ArrayKey = gp.ArrayKey("AFFS")
    affs_mask: gp.ArrayKey = gp.ArrayKey("AFFS_MASK")
    artifacts: gp.ArrayKey = gp.ArrayKey("ARTIFACTS")
    artifacts_alpha: gp.ArrayKey = gp.ArrayKey("ARTIFACTS_ALPHA")


class AnnotationMask(gp.BatchFilter):
    """Makes `mask` (1 = annotated voxel) and `instances` (1 = a voxel of an
    annotated instance), and zeroes the labels outside the mask.

    Dense volumes are annotated everywhere. With `sparse`, label 0 means
    unknown. With a mask dataset upstream (`given`), voxels outside it are
    unknown whatever their label, so their labels become 0: an unknown voxel
    must never look like a part of an annotated instance. A given mask may
    hold known background (label 0 inside it), which `instances` leaves out:
    sparse training samples locations by their annotated instances."""

    def __init__(self, labels: gp.ArrayKey, mask: gp.ArrayKey, instances: gp.ArrayKey, sparse: bool,
                 given: gp.ArrayKey | None):
        self.labels, self.mask, self.instances, self.sparse, self.given = labels, mask, instances, sparse, given

    def setup(self):
        spec = self.spec[self.labels].copy()
        spec.dtype = np.uint8
        spec.interpolatable = False
        self.provides(self.instances, spec.copy())
        if self.given is None:
            self.provides(self.mask, spec)
        else:
            self.updates(self.labels, self.spec[self.labels].copy())
            self.updates(self.mask, self.spec[self.mask].copy())

    def prepare(self, request):
        deps = gp.BatchRequest()
        rois = [request[key].roi for key in (self.mask, self.labels, self.instances) if key in request]
        roi = rois[0]
        for other in rois[1:]:
            roi = roi.union(other)
        deps[self.labels] = gp.ArraySpec(roi=roi)
        if self.given is not None:
            deps[self.given] = gp.ArraySpec(roi=roi)
        return deps

    def process(self, batch, request):
        labels = batch[self.labels]
        if self.given is not None:
            annotated = batch[self.given].crop(labels.spec.roi).data != 0
        elif self.sparse:
            annotated = labels.data != 0
        else:
            annotated = np.ones(labels.data.shape, dtype=bool)
        outputs = gp.Batch()
        for key, data in ((self.mask, annotated), (self.instances, annotated & (labels.data != 0))):
            if key in request:
                spec = self.spec[key].copy()
                spec.roi = labels.spec.roi
                outputs[key] = gp.Array(data.astype(spec.dtype), spec).crop(request[key].roi)
        if self.labels in request:
            cleared = gp.Array(np.where(annotated, labels.data, 0).astype(labels.data.dtype), labels.spec.copy())
            outputs[self.labels] = cleared.crop(request[self.labels].roi)
        return outputs


def best_share(integral: np.ndarray, window) -> float:
    """The largest share of set voxels in any box of shape `window` that
    fits inside a mask, from its integral image (inclusive cumulative sums
    along every axis, as gunpowder keeps it); 0 where none fits."""
    window = tuple(int(w) for w in window)
    if any(w > s for w, s in zip(window, integral.shape)):
        return 0.0
    padded = np.pad(integral.astype(np.int64), [(1, 0)] * integral.ndim)
    sums = np.zeros([s - w + 1 for s, w in zip(integral.shape, window)], dtype=np.int64)
    # inclusion-exclusion over the box's corners, for every box at once
    for corner in itertools.product((0, 1), repeat=integral.ndim):
        part = padded[tuple(slice(w, None) if c else slice(0, n - w) for c, w, n in zip(corner, window, padded.shape))]
        sums += part if (integral.ndim - sum(corner)) % 2 == 0 else -part
    return float(sums.max()) / math.prod(window)


class AnnotatedLocation(gp.RandomLocation):
    """gunpowder's RandomLocation with `min_masked`: it draws locations
    until one holds that share of annotated instance voxels, over the
    region it is asked for (the output and the context the augmentations
    read around it, which varies with the rotation drawn). Where no
    location can (annotation too sparse for a region that large), it drew
    forever, silently: a training on 5% of the nuclei hung before its first
    batch. So after MISSES_BEFORE_CHECK draws in a row that fail, the
    request's region is checked against every location at once
    (`best_share`, once per shape) and refused in one line if none can
    pass. The draws themselves are gunpowder's: feasible trainings get the
    same batches as before."""

    MISSES_BEFORE_CHECK = 1000  # about 50 ms of draws: a check (0.14 s on 40 nuclei pages) only where it pays

    def __init__(self, min_annotated: float, instances: gp.ArrayKey, field: str):
        super().__init__(min_masked=min_annotated, mask=instances)
        self.field = field
        self.misses = 0
        self.feasible: set[Coordinate] = set()

    # gunpowder 1.4.4 (pinned) tests each drawn location with this private
    # method, in a loop that ends only when one passes
    def _RandomLocation__is_min_masked(self, random_shift, request) -> bool:
        if super()._RandomLocation__is_min_masked(random_shift, request):
            self.misses = 0
            return True
        self.misses += 1
        if self.misses % self.MISSES_BEFORE_CHECK == 0:
            window = request[self.mask].roi.shape / self.spec[self.mask].voxel_size
            if window not in self.feasible:
                best = best_share(self.mask_integral, window)
                if best < self.min_masked:
                    raise UserError(
                        f"min_annotated: no location of {self.field} has {self.min_masked:g} of its {tuple(window)} "
                        f"voxels (the output and the context the augmentations read) in annotated instances; the "
                        f"best has {best:.4f}: lower min_annotated, or annotate more")
                self.feasible.add(window)
        return False


def _source(index: int, volume: TrainVolume, keys: TrainingKeys, min_annotated: float, in_channels: int):
    field = f"volumes.{index}"
    raw = open_volume(*split_path(volume.raw), field=f"{field}.raw", dtypes=("uint8",), dtype_hint=RAW_DTYPE_HINT)
    labels = open_volume(*split_path(volume.labels), field=f"{field}.labels", dtypes=LABEL_DTYPES)
    channels = raw.shape[0] if raw.channel_dims else 1
    if raw.channel_dims > 1 or channels != in_channels:
        raise UserError(f"{field}.raw: {volume.raw} has {channels} channel(s) (shape {raw.shape}), the network reads "
                        f"{in_channels} (network.in_channels)")
    if raw.voxel_size != labels.voxel_size:
        raise UserError(f"{field}: raw voxel size {tuple(raw.voxel_size)} differs from the labels' {tuple(labels.voxel_size)}")
    roi = labels.roi
    if volume.roi is not None:
        roi = Roi(volume.roi.offset, volume.roi.shape)
        if not labels.roi.contains(roi):
            raise UserError(f"{field}.roi: {roi} is not inside the labels' ROI {labels.roi}")
    if not raw.roi.contains(roi):
        raise UserError(f"{field}: the training ROI {roi} (the labels', unless roi is given) is not inside raw's ROI {raw.roi}")
    arrays = [gp.ArraySource(keys.raw, raw, interpolatable=True), gp.ArraySource(keys.labels, labels, interpolatable=False)]
    given = None
    # what says which voxels are annotated: with none, RandomLocation would
    # reject every location forever, and dense all-zero labels would teach
    # that nothing is an object
    annotation, annotation_field = labels, f"{field}.labels"
    if volume.labels_mask is not None:
        mask = open_volume(*split_path(volume.labels_mask), field=f"{field}.labels_mask", dtypes=LABEL_DTYPES)
        if mask.voxel_size != labels.voxel_size or not mask.roi.contains(roi):
            raise UserError(f"{field}.labels_mask: must have the labels' voxel size and cover the training ROI {roi}")
        given = keys.labels_mask
        arrays.append(gp.ArraySource(keys.labels_mask, mask, interpolatable=False))
        annotation, annotation_field = mask, f"{field}.labels_mask"
    # a chunk file missing reads as zeros: unannotated mask, background
    # labels, black raw, all silently
    checked = {"raw": raw, "labels": labels, **({"labels_mask": mask} if given is not None else {})}
    for name, volume_of in checked.items():
        check_complete(volume_of, roi, f"{field}.{name}")
    try:
        annotated = holds_nonzero(annotation, roi, annotation_field)
    except VolumeReadError as e:
        raise UserError(f"{annotation_field}: {e}") from e
    if not annotated:
        raise UserError(f"{annotation_field}: no voxel of the training ROI {roi} is non-zero, so nothing is annotated "
                        f"there; check the dataset, or leave this volume out")
    sparse = volume.sparse or given is not None
    source = tuple(arrays) + gp.MergeProvider() + gp.Crop(keys.raw, roi) + gp.Crop(keys.labels, roi)
    if given is not None:
        source += gp.Crop(keys.labels_mask, roi)
    source += (
        AnnotationMask(keys.labels, keys.labels_mask, keys.instances, volume.sparse, given)
        + gp.Normalize(keys.raw)
        # zero padding, exactly what prediction sees beyond the volume
        + gp.Pad(keys.raw, None)
    )
    if sparse and min_annotated > 0:
        return source + AnnotatedLocation(min_annotated, keys.instances, f"volumes.{index}")
    return source + gp.RandomLocation()


def _artifact_source(artifacts: ArtifactConfig, keys: TrainingKeys, voxel_size: Coordinate):
    """Random artifact sections, intensities and alpha both scaled to [0, 1]
    as DefectAugment blends them: raw * (1 - alpha) + artifact * alpha."""
    field = "augment.defects.artifacts"
    raw = open_volume(*split_path(artifacts.raw), field=f"{field}.raw", dtypes=("uint8",))
    alpha = open_volume(*split_path(artifacts.alpha), field=f"{field}.alpha", dtypes=("uint8",))
    if raw.voxel_size != voxel_size or alpha.voxel_size != voxel_size or raw.roi != alpha.roi:
        raise UserError(f"{field}: raw and alpha need one ROI and the training data's voxel size {tuple(voxel_size)}")
    source = (
        (gp.ArraySource(keys.artifacts, raw, interpolatable=True),
         gp.ArraySource(keys.artifacts_alpha, alpha, interpolatable=True))
        + gp.MergeProvider()
        + gp.Normalize(keys.artifacts)
        + gp.Normalize(keys.artifacts_alpha)
        + gp.RandomLocation()
    )
    # gunpowder 1.4.4's DefectAugment tears its source down with teardown(),
    # which a Pipeline names internal_teardown()
    source.teardown = source.internal_teardown
    return source


def _augmentations(augment: AugmentConfig, keys: TrainingKeys, voxel_size: Coordinate, planar: bool):
    """`planar`: a 2D network, whose sections are independent images: z is
    never swapped with y or x (whatever the voxel size), intensities change
    per section."""
    nodes = []
    if augment.elastic is not None:
        e = augment.elastic
        nodes.append(gp.ElasticAugment(
            control_point_spacing=e.control_point_spacing,
            jitter_sigma=e.jitter_sigma,
            rotation_interval=(0.0, np.pi / 2.0 if e.rotate else 0.0),
            prob_slip=e.prob_slip,
            prob_shift=e.prob_shift,
            max_misalign=e.max_misalign,
            subsample=e.subsample,
        ))
    if augment.mirror or augment.transpose:
        # axes with the voxel size of y (and x) may swap; z of anisotropic
        # data, and of any 2D data, stays
        swappable = tuple(axis for axis in range(3) if voxel_size[axis] == voxel_size[2] and not (planar and axis == 0))
        nodes.append(gp.SimpleAugment(
            mirror_only=None if augment.mirror else (),
            transpose_only=swappable if augment.transpose else (),
        ))
    if augment.intensity is not None:
        i = augment.intensity
        nodes.append(gp.IntensityAugment(keys.raw, *i.scale, *i.shift, z_section_wise=planar or voxel_size[0] != voxel_size[1]))
    if augment.defects is not None:
        d = augment.defects
        artifacts = {}
        if d.artifacts is not None:
            artifacts = dict(
                prob_artifact=d.artifacts.probability,
                artifact_source=_artifact_source(d.artifacts, keys, voxel_size),
                artifacts=keys.artifacts,
                artifacts_mask=keys.artifacts_alpha,
            )
        nodes.append(gp.DefectAugment(
            keys.raw, prob_missing=d.prob_missing, prob_low_contrast=d.prob_low_contrast,
            contrast_scale=d.contrast_scale, axis=0, **artifacts,
        ))
    if augment.grow_boundary:
        nodes.append(gp.GrowBoundary(keys.labels, steps=augment.grow_boundary, only_xy=True))
    return nodes


def training_pipeline(config: TrainConfig, keys: TrainingKeys, voxel_size: Coordinate):
    """Batches of raw, labels, labels_mask, affs and affs_mask with a batch
    dimension (raw also with a channel dimension), as torch wants them."""
    in_channels = config.network.in_channels
    if in_channels > 1 and config.augment.defects is not None:
        raise UserError("augment.defects: missing and low-contrast sections are EM defects of single-channel raw; "
                        "set defects: null for multi-channel raw")
    sources = tuple(_source(i, v, keys, config.min_annotated, in_channels) for i, v in enumerate(config.volumes))
    pipeline = sources + gp.RandomProvider()
    planar = getattr(config.network, "dims", 3) == 2
    for node in _augmentations(config.augment, keys, voxel_size, planar):
        pipeline += node
    pipeline += gp.AddAffinities(
        [tuple(o) for o in config.offsets], keys.labels, keys.affs,
        unlabelled=keys.labels_mask, affinities_mask=keys.affs_mask, dtype=np.float32,
    )
    if in_channels == 1:
        # single-channel raw is (z, y, x): the network wants a channel axis
        pipeline += gp.Unsqueeze([keys.raw])
    return pipeline + gp.Stack(config.batch_size)


def training_request(keys: TrainingKeys, input_shape: Coordinate, output_shape: Coordinate, voxel_size: Coordinate):
    request = gp.BatchRequest()
    request.add(keys.raw, input_shape * voxel_size)
    # instances too: RandomLocation checks min_annotated on the request's ROI
    for key in (keys.labels, keys.labels_mask, keys.instances, keys.affs, keys.affs_mask):
        request.add(key, output_shape * voxel_size)
    return request  # gunpowder centres the ROIs: raw's context lies evenly around the output


def volume_voxel_size(config: TrainConfig) -> Coordinate:
    sizes = {open_volume(*split_path(v.raw), field=f"volumes.{i}.raw").voxel_size for i, v in enumerate(config.volumes)}
    if len(sizes) > 1:
        raise UserError(f"volumes: all training volumes need one voxel size, got {sorted(tuple(s) for s in sizes)}")
    return sizes.pop()
