"""Fragment extraction and agglomeration primitives on in-memory block
arrays: waterz's watershed and region merging (our compiled port,
pipeline/kernels/compiled/waterz.py) and a seeded watershed. Workers add
the I/O around them. Affinities are uint8, as the datasets hold them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.kernels.compiled import waterz
from pipeline.kernels.compiled.flood import seeded_flood

# waterz's float view of an affinity byte v: float32(v) / 255, as the
# workers used to pass it, and its 256-level discretization of that
AS_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255)
BINS = np.where(AS_FLOAT >= 1, 255, np.minimum((AS_FLOAT * np.float32(256)).astype(np.int64), 255))
# waterz's prebuilt scoring functions: OneMinus<HistogramQuantileAffinity<..,
# Q, .., 256, false>> and OneMinus<MeanAffinity<..>>
QUANTILES = {"hist_quant_50": 50, "hist_quant_75": 75, "mean": waterz.MEAN}


def region_merging(affs: np.ndarray, labels: np.ndarray, n: int, scoring: str, threshold: float):
    """waterz's agglomeration of `labels` (int64, 0..n, 0 = background)
    until `threshold`. Returns (edges (E, 2) with u < v: the region graph,
    in (u, v) order; parent pointers of the regions (`waterz.roots`); the
    merges as rows (a, b, score): regions a < b became region a)."""
    quantile = QUANTILES[scoring]
    uv, first, values = waterz.region_graph(labels, affs, n)
    if quantile == waterz.MEAN:
        means = waterz.running_means(values, first, AS_FLOAT)
    else:
        waterz.sort_segments(values, first)
        means = np.zeros(0, np.float32)
    # waterz compares scores with the threshold as a C float
    parent, history = waterz.merge_regions(n, uv, first, values, BINS, means, quantile, np.float32(threshold))
    return uv, parent, history


def epsilon_agglomerate(affs: np.ndarray, fragments: np.ndarray | None, epsilon: float, scoring: str) -> np.ndarray:
    """Merge fragments whose agglomeration score is below `epsilon`; with
    `fragments=None`, waterz's watershed makes them first. 0 where no
    fragment.

    Watershed basins of real affinities are tiny and many (tens of voxels);
    every later hierarchical decision on them is noisy, and a block border
    that cuts them changes those decisions. Merging the confident ones
    first gives a few times fewer, larger fragments: the same scores at every
    threshold >= epsilon, a smaller graph, and block-wise results much closer
    to a one-block run (measured in the README)."""
    if fragments is None:
        labels = np.empty(affs.shape[1:], dtype=np.int64)
        n = waterz.watershed(affs, labels)
    else:
        labels = fragments.astype(np.int64)
        n = int(labels.max()) if labels.size else 0
    _, parent, _ = region_merging(affs, labels, n, scoring, epsilon)
    waterz.roots(parent, labels)
    # ids are >= 0: the same bytes read as uint64, not a copy of the block
    return labels.view(np.uint64)


def distance_watershed(affs: np.ndarray, voxel_size, per_section: bool) -> np.ndarray:
    """Seeded watershed on the distance transform of the boundary map:
    seeds are the maxima of the distance to the nearest boundary, where the
    mean nearest-neighbour affinity (uint8) is at most 0.5."""
    inside = affs[:3].mean(axis=0) > 127.5
    if per_section:
        fragments = np.zeros(inside.shape, dtype=np.uint64)
        next_id = 0
        for z in range(inside.shape[0]):
            section = _seeded(inside[z], voxel_size[1:])
            fragments[z] = np.where(section > 0, section + next_id, 0)
            next_id += int(section.max())
        return fragments
    return _seeded(inside, voxel_size).astype(np.uint64)


def _seeded(inside: np.ndarray, sampling) -> np.ndarray:
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(inside, sampling=sampling)
    maxima = (ndimage.maximum_filter(distance, size=3) == distance) & inside
    seeds, _ = ndimage.label(maxima)
    return watershed(-distance, seeds, mask=inside).astype(np.uint64)


def grow_over(segments: np.ndarray, holes: np.ndarray, affs: np.ndarray) -> np.ndarray:
    """`segments` (Z, Y, X) with the voxels of `holes` taken by the segments
    around them: a seeded watershed from every other labelled voxel over the
    nearest-neighbour affinity graph, strongest edges first
    (pipeline/kernels/compiled/flood.py), so a hole goes to the segment it
    is most strongly bound to, and a hole that spans a boundary splits
    along it. `affs[:3]` are uint8 affinities of the offsets -z, -y, -x
    (`config.offsets_error` makes every 3D model's first three so). A hole
    that no seed reaches (no other segment in the array) keeps its labels."""
    seeds = np.where(holes, 0, segments).astype(np.uint64)
    if not seeds.any() or not holes.any():
        return segments
    seeded_flood(np.ascontiguousarray(affs[:3], dtype=np.uint8), seeds, np.ascontiguousarray(holes))
    return np.where(seeds > 0, seeds, segments).astype(segments.dtype)


def merge_history(affs: np.ndarray, fragments: np.ndarray, scoring: str) -> tuple[np.ndarray, np.ndarray]:
    """Agglomerate consecutive-labelled `fragments` (0 = background) to the
    end. Returns (the region graph's edges, (E, 2) with u < v, in (u, v)
    order; the merges as rows (a, b, score): regions a < b became region a
    at that score)."""
    labels = fragments.astype(np.int64)
    uv, _, history = region_merging(affs, labels, int(labels.max()) if labels.size else 0, scoring, 1.0)
    return uv, history


def relabel_consecutive(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(consecutive labels with 0 kept as 0, sorted original ids of 1..n)."""
    top = int(labels.max()) if labels.size else 0
    if top > 4 * labels.size:
        ids, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape).astype(np.uint64)
        return (inverse, ids[1:]) if ids[0] == 0 else (inverse + 1, ids)
    # small ids (waterz's basins, compacted fragments): a presence table and
    # its running count relabel in two linear passes instead of a sort of
    # every voxel, the largest cost of this function on a block
    present = np.bincount(labels.ravel().astype(np.intp), minlength=top + 1) > 0
    present[0] = False
    rank = np.cumsum(present, dtype=np.uint64)
    return rank[labels], np.flatnonzero(present).astype(labels.dtype)


def node_statistics(local: np.ndarray, n: int, offset, voxel_size) -> tuple[np.ndarray, np.ndarray]:
    """Sizes (voxels) and centres (world units, z y x) of labels 1..n."""
    flat = local.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    centers = np.empty((n, 3))
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = local.shape[axis]
        position = np.broadcast_to(np.arange(local.shape[axis]).reshape(shape), local.shape).ravel()
        sums = np.bincount(flat, weights=position, minlength=n + 1)[1:]
        centers[:, axis] = offset[axis] + sums / np.maximum(sizes, 1) * voxel_size[axis]
    return sizes.astype(np.int64), centers
