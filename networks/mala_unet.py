"""Valid-convolution 3D U-Net (the MALA architecture).

Every convolution is unpadded, so each output voxel sees exactly the same
input context wherever it sits in a volume. Together with input offsets that
are multiples of the total downsampling factor, this makes block-wise
prediction identical to one pass over the whole volume: there are no seams.
The geometry (which shapes are valid, how much context the net eats) is
computed here, from the architecture, so that nothing downstream hand-copies
shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from networks.geometry import Geometry

# two 3x3x3 valid convolutions per level shave 2 * (3 - 1) = 4 voxels per axis
_SHRINK_PER_LEVEL = 4


def _conv_pass(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3),
        nn.ReLU(inplace=True),
    )


def _center_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    offsets = [(have - want) // 2 for have, want in zip(x.shape[-3:], shape)]
    slices = tuple(slice(o, o + s) for o, s in zip(offsets, shape))
    return x[(...,) + slices]


@dataclass(frozen=True)
class MalaUNetSpec:
    """Everything needed to rebuild the network; stored in checkpoints."""

    in_channels: int = 1
    num_fmaps: int = 12
    fmap_inc_factor: int = 3
    downsample_factors: tuple[tuple[int, int, int], ...] = ((2, 2, 2), (2, 2, 2))


class MalaUNet(nn.Module):
    """Valid U-Net; returns `num_fmaps` features per output voxel. The heads
    that turn them into a method's outputs belong to the method."""

    def __init__(self, spec: MalaUNetSpec):
        super().__init__()
        self.spec = spec
        factors = [tuple(f) for f in spec.downsample_factors]
        widths = [spec.num_fmaps * spec.fmap_inc_factor**level for level in range(len(factors) + 1)]
        self.down = nn.ModuleList()
        in_channels = spec.in_channels
        for width in widths:
            self.down.append(_conv_pass(in_channels, width))
            in_channels = width
        self.pool = nn.ModuleList(nn.MaxPool3d(f, stride=f) for f in factors)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level + 1], f, stride=f)
            for level, f in enumerate(factors)
        )
        self.up = nn.ModuleList(
            _conv_pass(widths[level + 1] + widths[level], widths[level])
            for level in range(len(factors))
        )
        self.out_channels = widths[0]
        # valid convolutions give each decoder level another extent: no
        # features of coarser levels are offered (see ResidualUNet.levels)
        self.level_factors: tuple[tuple[int, int, int], ...] = ()
        self.geometry = _mala_geometry(factors)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        skips = []
        x = raw
        for level, conv in enumerate(self.down):
            x = conv(x)
            if level < len(self.pool):
                skips.append(x)
                x = self.pool[level](x)
        for level in reversed(range(len(self.up))):
            x = self.upsample[level](x)
            x = torch.cat([_center_crop(skips[level], x.shape[-3:]), x], dim=1)
            x = self.up[level](x)
        return x


def _mala_geometry(factors: list[tuple[int, ...]]) -> Geometry:
    factors_np = np.array(factors, dtype=int).reshape(-1, 3)
    total_factor = tuple(int(v) for v in np.prod(factors_np, axis=0))

    def axis_output(size: int, axis: int) -> int | None:
        # follow one axis through the network: convolutions shrink it, pools
        # must divide it exactly, transposed convolutions multiply it back
        for f in factors_np[:, axis]:
            size -= _SHRINK_PER_LEVEL
            if size <= 0 or size % f:
                return None
            size //= f
        size -= _SHRINK_PER_LEVEL
        if size <= 0:
            return None
        for f in factors_np[::-1, axis]:
            size = size * f - _SHRINK_PER_LEVEL
            if size <= 0:
                return None
        return int(size)

    return Geometry(axis_output=axis_output, alignment=total_factor)
