"""Mutex watershed on an image's affinities (any dimension), and the 2D
post-processing around it: the foreground of a section, then small
segments merged into their most frequent neighbour (the methods notes'
pixel-embedded-affinity post-processing)."""

from __future__ import annotations

import mwatershed
import numpy as np
from scipy import ndimage

from pipeline.kernels.rag import offset_pairs
from pipeline.kernels.watershed import relabel_consecutive


def stride_mask(shape, offset, stride, rng: np.random.Generator | None = None) -> np.ndarray:
    """Which edges of one offset channel a strided mutex watershed keeps:
    those on the `stride` grid anchored at the lower voxel of each pair
    (where mwatershed's own `strides` anchor it), or, with `rng`, each edge
    with probability 1 / prod(stride), drawn from `rng` (mwatershed's
    randomised strides draw from an unseeded generator: not reproducible)."""
    if rng is not None:
        return rng.random(shape) < 1.0 / np.prod(stride)
    keep = np.zeros(shape, dtype=bool)
    # voxel p pairs with p + offset; the lower of the two is p + min(offset, 0)
    keep[tuple(slice((-min(o, 0)) % s, None, s) for o, s in zip(offset, stride))] = True
    return keep


def mutex_watershed(affs: np.ndarray, offsets, biases, strides=None, rng: np.random.Generator | None = None,
                    foreground: np.ndarray | None = None) -> np.ndarray:
    """Labels 1..n of an n-dimensional image (2D sections and 3D blocks alike).

    `affs` is (C, *shape) in [0, 1] with one offset per channel (n ints);
    channel c's edges weigh `affs[c] - biases[c]`: above its bias an edge
    attracts, below it repels, strongest first (the methods notes' split is
    bias 0 for the nearest neighbours, 1 for the long-range offsets).
    `strides`: per channel, None (every edge) or n ints: only the edges on
    that grid, or with `rng` a random 1 / prod(stride) of them (see
    `stride_mask`); long-range edges mostly repel, and all of them
    over-split. With a `foreground` mask only foreground voxels are
    partitioned and the background is label 0."""
    # mwatershed wants float64: positive = attractive, negative = repulsive
    weights = np.ascontiguousarray(affs, dtype=np.float64) - np.asarray(biases, dtype=np.float64).reshape(-1, *[1] * (affs.ndim - 1))
    shape = affs.shape[1:]
    for c, offset in enumerate(offsets):
        stride = None if strides is None else strides[c]
        if stride is not None and (rng is not None or any(s > 1 for s in stride)):
            # a weight of 0 is no edge: processed last, when nothing merges any more
            weights[c][~stride_mask(shape, offset, stride, rng)] = 0.0
        if foreground is not None:
            # every edge that touches the background repels as strongly as
            # possible: background voxels stay alone and no segment grows
            # through them, as if the graph held the foreground only
            here, there = offset_pairs(shape, offset)
            touches = np.ones(shape, dtype=bool)
            touches[here] = ~(foreground[here] & foreground[there])
            weights[c][touches] = -1.0
    labels = mwatershed.agglom(weights, [list(o) for o in offsets]).astype(np.uint64)
    # mwatershed labels every voxel that joined no other 0: each is a
    # segment of its own (it once became background in the 2D path)
    alone = labels == 0 if foreground is None else (labels == 0) & foreground
    labels[alone] = labels.max() + 1 + np.arange(np.count_nonzero(alone), dtype=np.uint64)
    if foreground is not None:
        labels[~foreground] = 0
    return relabel_consecutive(labels)[0]


def long_range_strides(offsets, stride) -> list | None:
    """Per channel: None for the nearest neighbours (offsets of one step
    along one axis), `stride` for the long-range offsets; None for none."""
    if stride is None:
        return None
    return [None if sum(abs(o) for o in offset) == 1 else list(stride) for offset in offsets]


def clean_foreground(probability: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
    """The foreground of one section: probability above `threshold`, minus
    connected specks smaller than `min_size` pixels."""
    foreground = probability > threshold
    components, n = ndimage.label(foreground)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    return foreground & (sizes >= min_size)[components]


def merge_small_segments(labels: np.ndarray, cascade) -> np.ndarray:
    """For each (size, window) in turn, every segment smaller than `size`
    pixels joins the label most frequent within a `window` x `window`
    neighbourhood around it. Returns consecutive labels 1..n."""
    labels = relabel_consecutive(labels)[0].astype(np.int64)
    for min_size, window in cascade:
        sizes = np.bincount(labels.ravel())
        boxes = ndimage.find_objects(labels)
        footprint = np.ones((window, window), dtype=bool)
        half = window // 2
        for label in np.argsort(sizes, kind="stable"):
            if label == 0 or sizes[label] == 0 or sizes[label] >= min_size or boxes[label - 1] is None:
                continue
            box = tuple(slice(max(0, s.start - half), s.stop + half) for s in boxes[label - 1])
            patch = labels[box]
            member = patch == label
            around = patch[ndimage.binary_dilation(member, footprint) & ~member]
            around = around[around > 0]
            if around.size == 0:
                continue
            values, counts = np.unique(around, return_counts=True)
            target = values[np.argmax(counts)]
            patch[member] = target
            # the target now covers this segment's pixels too
            boxes[target - 1] = tuple(
                slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(boxes[target - 1], boxes[label - 1])
            )
            sizes[target] += sizes[label]
            sizes[label] = 0
    return relabel_consecutive(labels.astype(np.uint64))[0]
