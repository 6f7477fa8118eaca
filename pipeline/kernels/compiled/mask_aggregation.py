"""MaskAggr on the CPU, one pass over the voxels per level
(pipeline/methods/mask_aggregation.py is the method and its torch form).

The torch form updates whole-page arrays once per (level phase, offset,
window position): on a CPU each update streams the three running sums of
a page through memory (50 KB per voxel on a nuclei page, 1 GFLOP/s). Here
each voxel keeps its running sums in registers while it visits every mask
that holds its pair, reading the masks channel-last (a centre's mask is
contiguous); the voxels' rows are shared among the threads. The updates
are the torch form's, in its order (level, then window position) and in
float32, so the two agree to rounding (tests/test_mask_aggregation.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def add_level(stats, masks, factor, table, counts):
    """One level's masks into `stats` (3, B, C, Z, Y, X) float32: weight,
    mean, spread. `masks` (B, Zl, Yl, Xl, K) float32, channel-last;
    `factor` (3,) the level's downsampling; `table` (P, C, J, 5) int64 and
    `counts` (P, C): for phase p (C order over the factor's phases) and
    offset c, the first counts[p, c] rows (k_here, k_there, dz, dy, dx)
    name the window positions whose mask holds the pair: the mask centred
    at the level voxel minus (dz, dy, dx), read at k_here and k_there."""
    _, batch, channels, depth, height, width = stats.shape
    _, zl, yl, xl, _ = masks.shape
    fz, fy, fx = factor[0], factor[1], factor[2]
    zero = np.float32(0)
    for row in prange(batch * depth * height):
        b = row // (depth * height)
        z = (row // height) % depth
        y = row % height
        for x in range(width):
            phase = ((z % fz) * fy + (y % fy)) * fx + (x % fx)
            uz, uy, ux = z // fz, y // fy, x // fx
            for c in range(channels):
                weight = stats[0, b, c, z, y, x]
                mean = stats[1, b, c, z, y, x]
                spread = stats[2, b, c, z, y, x]
                for j in range(counts[phase, c]):
                    cz = uz - table[phase, c, j, 2]
                    cy = uy - table[phase, c, j, 3]
                    cx = ux - table[phase, c, j, 4]
                    if cz < 0 or cz >= zl or cy < 0 or cy >= yl or cx < 0 or cx >= xl:
                        continue
                    here = masks[b, cz, cy, cx, table[phase, c, j, 0]]
                    there = masks[b, cz, cy, cx, table[phase, c, j, 1]]
                    affinity = min(here, there)
                    evidence = max(here, there)
                    total = weight + evidence
                    difference = affinity - mean
                    shift = difference * evidence / total if total > zero else zero
                    spread += weight * difference * shift
                    mean += shift
                    weight = total
                stats[0, b, c, z, y, x] = weight
                stats[1, b, c, z, y, x] = mean
                stats[2, b, c, z, y, x] = spread
