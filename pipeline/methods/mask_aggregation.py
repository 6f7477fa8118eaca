"""MaskAggr (methods notes, section C): affinities for any offsets, and
their uncertainty, from the latent-mask method's decoded single-instance
masks.

Every voxel c of a level predicts a mask over a window around it: m_c(δ),
the chance that voxel c + δ (in that level's voxels) belongs to c's
object, for the window's positions δ. For a pair (u, u + o), every mask
whose window holds both voxels gives an affinity a = min(m(u), m(u + o))
(fuzzy AND) with the evidence w = max(m(u), m(u + o)) (fuzzy OR); the
pair's affinity is the evidence-weighted mean of those, and its
uncertainty their weighted variance, accumulated mask by mask with West's
weighted form of Welford's algorithm (no sum of squares to cancel). The
published code read only the mask centred at u and gave no variance
(`centre_only`).

A level downsampled by f (the coarser decoder levels) covers f times the
space with the same window: a fine voxel u lies in the level's voxel u //
f, so the pair (u, u + o) is the level's pair (u // f, (u + o) // f), whose
offset depends on u's phase u % f. Each phase is one strided view of the
output, taken with its own offset.

It runs where the masks are: torch on the GPU, batched over the batch
axis; on a CPU a compiled kernel that visits each voxel once per level
(pipeline/kernels/compiled/mask_aggregation.py), tested against the torch
form.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pipeline.kernels.rag import offset_pairs

Triple = tuple[int, int, int]


def window_positions(window: Triple) -> list[Triple]:
    """The window's positions δ (odd sizes, centred on 0), in the C order
    of a mask's channels."""
    if any(s < 1 or s % 2 == 0 for s in window):
        raise ValueError(f"a mask window has odd sizes, not {tuple(window)}")
    return list(itertools.product(*(range(-(s // 2), s // 2 + 1) for s in window)))


def mask_reach(window: Triple, factors: list[Triple]) -> Triple:
    """Voxels of masks needed beyond a block on each side so that every
    mask holding a pair that starts in the block is read (blocks on the
    coarsest level's grid)."""
    return tuple(max((s // 2) * f[axis] for f in factors) for axis, s in enumerate(window))


def aggregate_masks(levels: list[tuple[torch.Tensor, Triple]], window: Triple, offsets,
                    centre_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(affinities, variance), each (B, len(offsets), Z, Y, X) float32, of
    `levels`: (masks (B, K, Z / f, Y / f, X / f), f) with K = the window's
    positions (`window_positions` order) and Z, Y, X divisible by f. The
    affinity of offset o at voxel u is that of the pair (u, u + o); a pair
    that no mask with any evidence holds gets 0 and variance 0.
    `centre_only`: the published code's variant, the mask centred at u of
    the finest level alone (variance 0). On a CPU the compiled kernel
    (pipeline/kernels/compiled/mask_aggregation.py) does the updates,
    elsewhere torch (`add_level_torch`), in the same order."""
    positions = window_positions(window)
    fine = {tuple(s * f for s, f in zip(masks.shape[2:], factor)) for masks, factor in levels}
    if len(fine) != 1 or any(masks.shape[1] != len(positions) for masks, _ in levels):
        raise ValueError("every level's masks must hold the window's positions and cover the same voxels")
    shape = fine.pop()
    masks0 = levels[0][0]
    stats = torch.zeros((3, masks0.shape[0], len(offsets), *shape), dtype=torch.float32, device=masks0.device)
    for masks, factor in levels[:1] if centre_only else levels:
        pairs = held_pairs(window, factor, offsets, centre_only)
        if masks.device.type == "cpu":
            add_level_compiled(stats, masks, factor, pairs)
        else:
            add_level_torch(stats, masks, factor, pairs)
    weight, mean, spread = stats
    held = weight > 0
    return mean, torch.where(held, spread / weight.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def held_pairs(window: Triple, factor: Triple, offsets, centre_only: bool) -> list[list[list[tuple[int, int, Triple]]]]:
    """Per phase of the level (C order over the factor's phases) and offset:
    the masks that hold the pairs starting at that phase, as (the window
    position of the pair's first voxel, that of its partner, the first
    voxel's position δ from the mask's centre), in window order."""
    positions = window_positions(window)
    index = {delta: k for k, delta in enumerate(positions)}
    result = []
    for phase in itertools.product(*(range(f) for f in factor)):
        per_offset = []
        for offset in offsets:
            # the level's offset of the pairs that start at this phase
            step = tuple((r + o) // f for r, o, f in zip(phase, offset, factor))
            held = []
            for delta in [(0, 0, 0)] if centre_only else positions:
                partner = tuple(d + s for d, s in zip(delta, step))
                if partner in index:
                    held.append((index[delta], index[partner], delta))
            per_offset.append(held)
        result.append(per_offset)
    return result


def add_level_compiled(stats: torch.Tensor, masks: torch.Tensor, factor: Triple, pairs) -> None:
    """`add_level_torch` by the compiled kernel, on CPU tensors."""
    from pipeline.kernels.compiled.mask_aggregation import add_level

    longest = max((len(held) for per_offset in pairs for held in per_offset), default=0)
    table = np.zeros((len(pairs), len(pairs[0]), max(1, longest), 5), dtype=np.int64)
    counts = np.zeros((len(pairs), len(pairs[0])), dtype=np.int64)
    for p, per_offset in enumerate(pairs):
        for c, held in enumerate(per_offset):
            counts[p, c] = len(held)
            for j, (here, there, delta) in enumerate(held):
                table[p, c, j] = (here, there, *delta)
    channel_last = np.ascontiguousarray(masks.detach().movedim(1, -1).numpy(), dtype=np.float32)
    add_level(stats.numpy(), channel_last, np.asarray(factor, dtype=np.int64), table, counts)


def add_level_torch(stats: torch.Tensor, masks: torch.Tensor, factor: Triple, pairs) -> None:
    """One level's masks (B, K, Z / f, Y / f, X / f) into `stats` (weight,
    mean, spread; (3, B, C, Z, Y, X)), a whole-array update per held pair of
    each phase and offset (`held_pairs`)."""
    for phase, per_offset in zip(itertools.product(*(range(f) for f in factor)), pairs):
        view = stats[(slice(None), slice(None), slice(None), *(slice(r, None, f) for r, f in zip(phase, factor)))]
        for c, held in enumerate(per_offset):
            for here, there, delta in held:
                _add_mask(view[:, :, c], masks[:, here], masks[:, there], delta)


def _add_mask(stats: torch.Tensor, here: torch.Tensor, there: torch.Tensor, delta: Triple) -> None:
    """One mask per voxel into `stats` (weight, mean, spread; each (B, Z,
    Y, X)): the mask centred at c = u - delta, whose values at u and at the
    partner are here[c] and there[c]. Voxels whose centre lies outside are
    left as they are."""
    centres, voxels = offset_pairs(here.shape[1:], delta)
    a_here, a_there = here[(slice(None), *centres)], there[(slice(None), *centres)]
    affinity, evidence = torch.minimum(a_here, a_there), torch.maximum(a_here, a_there)
    weight, mean, spread = (s[(slice(None), *voxels)] for s in stats)
    total = weight + evidence
    difference = affinity - mean
    shift = torch.where(total > 0, difference * evidence / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    spread += weight * difference * shift
    mean += shift
    weight.copy_(total)

