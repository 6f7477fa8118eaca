"""Fragment extraction and agglomeration primitives (waterz and a seeded
watershed), on in-memory block arrays. Workers add the I/O around them."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import numpy as np
import waterz
from scipy import ndimage

# prebuilt in the waterz wheel: no compiler or boost headers needed
SCORING_FUNCTIONS = {
    "hist_quant_50": "OneMinus<HistogramQuantileAffinity<RegionGraphType,50,ScoreValue,256,false>>",
    "hist_quant_75": "OneMinus<HistogramQuantileAffinity<RegionGraphType,75,ScoreValue,256,false>>",
    "mean": "OneMinus<MeanAffinity<RegionGraphType,ScoreValue>>",
}


@contextmanager
def _quiet_stdout():
    """waterz's C++ core prints several lines per call to the process's
    stdout; on a large run that would bury the worker logs."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _agglomerate(affs: np.ndarray, threshold: float, scoring: str, fragments: np.ndarray | None, history: bool):
    """One waterz run up to `threshold` on the 3 nearest-neighbour channels:
    its own watershed first when no fragments are given."""
    with _quiet_stdout():
        result = next(
            waterz.agglomerate(
                np.ascontiguousarray(affs[:3], dtype=np.float32),
                [threshold],
                fragments=None if fragments is None else np.ascontiguousarray(fragments, dtype=np.uint64),
                scoring_function=SCORING_FUNCTIONS[scoring],
                discretize_queue=256,
                return_merge_history=history,
            )
        )
    # waterz reuses one output buffer across thresholds: copy it
    return (result[0].copy(), result[1]) if history else result.copy()


def epsilon_agglomerate(affs: np.ndarray, fragments: np.ndarray | None, epsilon: float, scoring: str) -> np.ndarray:
    """Merge fragments whose agglomeration score is below `epsilon`; with
    `fragments=None`, waterz's own watershed makes them first, in the same
    pass (the region graph is built once). 0 where no fragment.

    Watershed basins of real affinities are tiny and many (tens of voxels);
    every later hierarchical decision on them is noisy, and a block border
    that cuts them changes those decisions. Merging the confident ones
    first gives a few times fewer, larger fragments: the same scores at every
    threshold >= epsilon, a smaller graph, and block-wise results much closer
    to a one-block run (measured in the README)."""
    return _agglomerate(affs, epsilon, scoring, fragments, history=False)


def distance_watershed(affs: np.ndarray, voxel_size, per_section: bool) -> np.ndarray:
    """Seeded watershed on the distance transform of the boundary map:
    seeds are the maxima of the distance to the nearest boundary, where the
    mean nearest-neighbour affinity is at most 0.5."""
    inside = affs[:3].mean(axis=0) > 0.5
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


def merge_history(affs: np.ndarray, fragments: np.ndarray, scoring: str) -> np.ndarray:
    """Agglomerate consecutive-labelled `fragments` (0 = background) to the
    end and return the merges as rows (a, b, c, score): regions a and b
    became region c at that score."""
    _, history = _agglomerate(affs, 1.0, scoring, fragments, history=True)
    rows = np.array([(m["a"], m["b"], m["c"], m["score"]) for m in history], dtype=np.float64)
    return rows.reshape(-1, 4)


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
