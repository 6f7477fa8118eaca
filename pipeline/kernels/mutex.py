"""Mutex watershed on an image's affinities (up to three dimensions), and the 2D
post-processing around it: the foreground of a section, then small
segments merged into their most frequent neighbour (the methods notes'
pixel-embedded-affinity post-processing)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.kernels.compiled.grid_mutex import LEVELS, grid_edges, tie_order
from pipeline.kernels.graph_mutex import mutex_clusters
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


TIE_RUN = 8  # a power of two: the scatter finds an edge's run by a shift


def mutex_watershed(affs: np.ndarray, offsets, biases, strides=None, rng: np.random.Generator | None = None,
                    foreground: np.ndarray | None = None, tie_seed: int = 0) -> np.ndarray:
    """Labels 1..n of an image of up to three dimensions (2D sections and
    3D blocks alike).

    `affs` is (C, *shape) uint8 (0..255, as stored) with one offset per
    channel (n ints); channel c's edges weigh `affs[c] / 255 - biases[c]`:
    above its bias an edge attracts, below it repels, strongest first (the
    methods notes' split is bias 0 for the nearest neighbours, 1 for the
    long-range offsets); `edge_order` says in which order exactly.
    `strides`: per channel, None (every edge) or n ints: only the edges on
    that grid, or with `rng` a random 1 / prod(stride) of them (see
    `stride_mask`); long-range edges mostly repel, and all of them
    over-split. With a `foreground` mask only foreground voxels are
    partitioned and the background is label 0; a voxel that joins no other
    is a segment of its own."""
    pairs, bounds = edge_order(affs, offsets, biases, strides, rng, foreground, tie_seed)
    shape = affs.shape[1:]
    n = int(np.prod(shape))
    counts = np.diff(bounds)
    buckets = [[pairs[bounds[k] : bounds[k + 1]]] if counts[k] else [] for k in range(len(counts))]
    parent = mutex_clusters(n, buckets, int(counts[0::2].sum()), pairs.dtype)
    labels = parent.astype(np.uint64).reshape(shape) + np.uint64(1)
    if foreground is not None:
        labels[~np.asarray(foreground, dtype=bool)] = 0
    return relabel_consecutive(labels)[0]


def edge_order(affs: np.ndarray, offsets, biases, strides=None, rng: np.random.Generator | None = None,
               foreground: np.ndarray | None = None, tie_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The edges of `mutex_watershed` in the order it takes them: (pairs
    (E, 2) of flat voxel indices, bounds): bucket k is pairs[bounds[k]:
    bounds[k + 1]], even k repel, odd k attract (graph_mutex.bucket_of).

    An edge's strength is 2 affs - round(510 bias), in -510..510: the sign
    and order of affs / 255 - bias exactly for any bias on a 1/510 grid (0,
    0.1, ..., 1 are; pipeline/kernels/compiled/grid_mutex.py); strongest
    first, repulsion before attraction at equal strength. Within a strength
    the order is random, drawn from `tie_seed`: runs of TIE_RUN edges
    (consecutive in channel-by-channel, C order) taken in a shuffled order.
    uint8 affinities tie everywhere, and the fixed order joined all the z
    edges of a strength before any y edge, which on the held-out fib25
    sections cost 0.4 in VOI against the shuffled runs
    (docs/performance.md, "The order of ties")."""
    affs = np.asarray(affs)
    if affs.dtype != np.uint8:
        raise TypeError(f"mutex_watershed takes uint8 affinities (0..255, as stored), not {affs.dtype}")
    shape = affs.shape[1:]
    if not 1 <= len(shape) <= 3 or len(offsets) != len(affs) or len(biases) != len(affs):
        raise ValueError(f"affinities {affs.shape}: 1 to 3 dimensions, one offset and one bias per channel")
    # one compiled kernel for every dimension: an image of fewer is a 3D one of depth 1
    grid = (1,) * (3 - len(shape)) + shape
    pad = [0] * (3 - len(shape))
    offsets3 = np.array([pad + [int(o) for o in offset] for offset in offsets], dtype=np.int64).reshape(-1, 3)
    bias2 = np.rint(np.asarray(biases, dtype=np.float64) * LEVELS).astype(np.int64)
    if ((bias2 < 0) | (bias2 > LEVELS)).any():
        raise ValueError(f"mutex biases must lie in [0, 1], not {list(biases)}")
    keep = np.ones((len(affs), *grid), dtype=bool)
    for c, offset in enumerate(offsets):
        stride = None if strides is None else strides[c]
        if stride is not None and (rng is not None or any(s > 1 for s in stride)):
            keep[c] = stride_mask(shape, offset, stride, rng).reshape(grid)
    inside = np.ones(grid, dtype=bool) if foreground is None else np.asarray(foreground, dtype=bool).reshape(grid)
    affs = np.ascontiguousarray(affs.reshape(len(affs), *grid))
    index_type = np.int32 if int(np.prod(grid)) < 2**31 else np.int64
    run_bits = TIE_RUN.bit_length() - 1
    if TIE_RUN != 1 << run_bits:
        raise ValueError(f"TIE_RUN must be a power of two, not {TIE_RUN}")
    # two passes: count each bucket's edges, then deal them into one array,
    # each bucket's runs of ties where `tie_order` draws them
    counts = np.zeros(2 * LEVELS + 1, dtype=np.int64)
    none = np.empty(0, dtype=np.int64)
    grid_edges(affs, offsets3, bias2, keep, inside, counts, np.empty((0, 2), dtype=index_type), none, none,
               run_bits, False)
    bounds = np.concatenate([[0], np.cumsum(counts[: 2 * LEVELS])])  # strength 0 is no edge
    first_run, run_start = tie_order(bounds, np.uint64(tie_seed), run_bits)
    pairs = np.empty((bounds[-1], 2), dtype=index_type)
    grid_edges(affs, offsets3, bias2, keep, inside, np.zeros_like(counts), pairs, first_run, run_start, run_bits,
               True)
    return pairs, bounds


def block_tie_seed(seed: int, index: int) -> int:
    """The tie order's seed of a block or section: from the run's
    `mutex.seed` and the block's (or section's) index only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


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
