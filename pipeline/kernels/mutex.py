"""2D post-processing: mutex watershed on one section's affinities, then
small segments merged into their most frequent neighbour (the methods
notes' pixel-embedded-affinity post-processing)."""

from __future__ import annotations

import mwatershed
import numpy as np
from scipy import ndimage

from pipeline.kernels.rag import offset_pairs
from pipeline.kernels.watershed import relabel_consecutive


def mutex_section(affs: np.ndarray, offsets, bias: float, foreground: np.ndarray | None = None) -> np.ndarray:
    """Labels 1..n of one section. `affs` is (C, Y, X) in [0, 1] with
    in-plane `offsets` (dy, dx); affinities above `bias` attract, below it
    repel, strongest first. With a `foreground` mask, only foreground pixels
    are partitioned and the background is label 0."""
    # mwatershed wants float64: positive = attractive, negative = repulsive
    weights = np.ascontiguousarray(affs, dtype=np.float64) - bias
    if foreground is not None:
        # every edge that touches the background repels as strongly as
        # possible: background pixels stay alone and no segment grows
        # through them, as if the graph held the foreground only
        for c, offset in enumerate(offsets):
            here, there = offset_pairs(foreground.shape, offset)
            touches = np.ones(foreground.shape, dtype=bool)
            touches[here] = ~(foreground[here] & foreground[there])
            weights[c][touches] = -1.0
    labels = mwatershed.agglom(weights, [list(o) for o in offsets])
    if foreground is not None:
        labels = np.where(foreground, labels, 0)
    return relabel_consecutive(labels)[0]


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
