"""Residual U-Net with same padding: the "SuperHuman" 3D network and the 2D
residual U-Net of the methods notes, one class.

- 3D: each level is a 1x3x3 convolution followed by two 3x3x3 convolutions
  with BatchNorm and ELU, added back onto the 1x3x3 output; 1x5x5 input and
  output embeddings; upsampling (trilinear) plus a 1x1x1 convolution, with
  skips merged by addition.
- 2D (`dims=2`): the same layout with 3x3 convolutions, BatchNorm and ReLU.
  It takes and returns (B, C, Z, Y, X) like every network here and runs on
  each z-section on its own, so the predict step and the gunpowder pipeline
  treat 2D data as volumes of single sections.

Same padding lets any input size through, but voxels near the input's border
see zeros instead of data. The network therefore crops `crop` voxels off each
side of its output: what it returns is only what saw enough context, and its
`Geometry` reports the loss like a valid network's, so block-wise prediction
takes its context from the model instead of a hand-set margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from networks.geometry import Geometry


@dataclass(frozen=True)
class ResidualUNetSpec:
    """Everything needed to rebuild the network; stored in checkpoints."""

    in_channels: int = 1
    dims: int = 3
    widths: tuple[int, ...] = (28, 36, 48, 64, 80)
    # (z, y, x) per level; (1, 2, 2) is the anisotropic pooling of serial-section EM
    downsample_factors: tuple[tuple[int, int, int], ...] = ((1, 2, 2),) * 4
    # voxels dropped from each side of the output, z y x
    crop: tuple[int, int, int] = (2, 16, 16)

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if len(self.widths) != len(self.downsample_factors) + 1:
            raise ValueError("widths needs one entry more than downsample_factors (the bottom level)")
        total = np.prod(np.array(self.downsample_factors, dtype=int).reshape(-1, 3), axis=0)
        if self.dims == 2 and (total[0] != 1 or self.crop[0] != 0):
            raise ValueError("a 2D network neither pools nor crops along z: use factors (1, f, f) and crop (0, c, c)")
        if any((2 * c) % f for c, f in zip(self.crop, total)):
            raise ValueError(f"2 * crop {self.crop} must be a multiple of the total downsampling {tuple(total)}")


class _Layers:
    """Convolutions, norms and resampling of one dimensionality, so that the
    network below is written once for 2D and 3D."""

    def __init__(self, dims: int):
        self.dims = dims
        self.conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        self.activation = nn.ELU if dims == 3 else nn.ReLU
        self.mode = "trilinear" if dims == 3 else "bilinear"

    def kernel(self, z: int, yx: int):
        return (z, yx, yx) if self.dims == 3 else (yx, yx)

    def factor(self, f: tuple[int, int, int]):
        return tuple(f) if self.dims == 3 else tuple(f[1:])

    def same_conv(self, in_channels: int, out_channels: int, z: int, yx: int) -> nn.Module:
        kernel = self.kernel(z, yx)
        return self.conv(in_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel))


class _ResidualBlock(nn.Module):
    def __init__(self, layers: _Layers, in_channels: int, out_channels: int):
        super().__init__()
        # in 3D the entry convolution is in-plane only, as in SuperHuman
        self.entry = layers.same_conv(in_channels, out_channels, 1, 3)
        self.body = nn.Sequential(
            layers.same_conv(out_channels, out_channels, 3, 3),
            layers.norm(out_channels),
            layers.activation(),
            layers.same_conv(out_channels, out_channels, 3, 3),
            layers.norm(out_channels),
        )
        self.activation = layers.activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return self.activation(x + self.body(x))


class _Up(nn.Module):
    def __init__(self, layers: _Layers, in_channels: int, out_channels: int):
        super().__init__()
        self.mode = layers.mode
        self.project = layers.conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # to the skip's size: the pooling factor, since inputs divide exactly
        x = nn.functional.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        return self.project(x) + skip


class ResidualUNet(nn.Module):
    """Returns `widths[0]` features per voxel, cropped by `spec.crop`; with
    `levels=True` also the decoder's coarser levels (1/2, 1/4, ...), each
    cropped to the same region. The heads belong to the method."""

    def __init__(self, spec: ResidualUNetSpec):
        super().__init__()
        self.spec = spec
        layers = _Layers(spec.dims)
        widths = spec.widths
        self.embed_in = layers.same_conv(spec.in_channels, widths[0], 1, 5)
        self.down = nn.ModuleList(
            _ResidualBlock(layers, widths[max(level - 1, 0)], widths[level]) for level in range(len(widths))
        )
        self.pool = nn.ModuleList(layers.pool(layers.factor(f)) for f in spec.downsample_factors)
        self.up = nn.ModuleList(
            _Up(layers, widths[level + 1], widths[level]) for level in range(len(spec.downsample_factors))
        )
        self.up_blocks = nn.ModuleList(
            _ResidualBlock(layers, widths[level], widths[level]) for level in range(len(spec.downsample_factors))
        )
        self.embed_out = layers.same_conv(widths[0], widths[0], 1, 5)
        self.out_channels = widths[0]
        # decoder levels 1 (1/2), 2 (1/4), ... down to the bottom: widths and
        # (z, y, x) downsampling against the output
        self.level_widths = tuple(widths[1:])
        self.level_factors = tuple(
            tuple(int(v) for v in np.prod(np.array(spec.downsample_factors[:level]).reshape(-1, 3), axis=0))
            for level in range(1, len(widths))
        )
        self.geometry = _cropped_geometry(spec)

    def forward(self, raw: torch.Tensor, levels: bool = False) -> torch.Tensor | list[torch.Tensor]:
        if raw.dim() != 5:
            raise ValueError(f"expected (batch, channels, z, y, x), got shape {tuple(raw.shape)}")
        batch, _, depth = raw.shape[:3]
        x = raw
        if self.spec.dims == 2:  # sections become batch entries
            x = x.permute(0, 2, 1, 3, 4).reshape(batch * depth, raw.shape[1], *raw.shape[3:])
        x = self.embed_in(x)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.pool):
                skips.append(x)
                x = self.pool[level](x)
        decoded = [x]  # the bottom level
        for level in reversed(range(len(self.up))):
            x = self.up_blocks[level](self.up[level](x, skips[level]))
            decoded.append(x)
        out = self._restore(self.embed_out(x), batch, depth, (1, 1, 1))
        if not levels:
            return out
        # finest first: the output, then levels 1 (1/2), 2 (1/4), ...
        coarse = decoded[-2::-1]
        return [out, *(self._restore(f, batch, depth, factor) for f, factor in zip(coarse, self.level_factors))]

    def _restore(self, x: torch.Tensor, batch: int, depth: int, factor) -> torch.Tensor:
        """Back to (B, C, Z, Y, X) and cropped to the output region, which
        at a level downsampled by `factor` is `crop / factor` voxels in."""
        if self.spec.dims == 2:
            x = x.reshape(batch, depth, x.shape[1], *x.shape[2:]).permute(0, 2, 1, 3, 4)
        crop = tuple(slice(c // f, x.shape[2 + axis] - c // f) for axis, (c, f) in enumerate(zip(self.spec.crop, factor)))
        return x[(..., *crop)]


def _cropped_geometry(spec: ResidualUNetSpec) -> Geometry:
    total = tuple(int(v) for v in np.prod(np.array(spec.downsample_factors, dtype=int).reshape(-1, 3), axis=0))

    def axis_output(size: int, axis: int) -> int | None:
        # every pooling must divide the size exactly, so that skips line up
        # and block-wise inputs stay on one pooling grid
        out = size - 2 * spec.crop[axis]
        return out if size % total[axis] == 0 and out > 0 else None

    return Geometry(axis_output=axis_output, alignment=total)
