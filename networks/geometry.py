"""Shapes a network accepts and produces, derived from its architecture.

The predict step asks a model's `Geometry` for block shapes instead of
reading them from a config, so a changed architecture can never run with
stale, hand-copied numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Geometry:
    """`axis_output(n, axis)` is the output size for input size `n` along
    `axis`, or None if `n` is not a valid input size there. `alignment` is
    the step (in voxels) by which inputs may be shifted while outputs shift
    by the same amount: the product of the downsampling factors."""

    axis_output: Callable[[int, int], int | None]
    alignment: Shape

    def _min_input(self, axis: int) -> int:
        for n in range(1, 4096):
            if self.axis_output(n, axis) is not None:
                return n
        raise ValueError(f"no valid input size below 4096 along axis {axis}")

    @property
    def context(self) -> Shape:
        """Voxels lost per axis in total (half on each side)."""
        return tuple(
            self._min_input(a) - self.axis_output(self._min_input(a), a) for a in range(3)
        )

    def input_shape(self, output_shape: Shape) -> Shape:
        return tuple(o + c for o, c in zip(output_shape, self.context))

    def valid_output_shape(self, at_least: Shape) -> Shape:
        """The smallest valid output shape that is at least `at_least` and a
        multiple of the alignment (so that blocks tiled by it stay aligned)."""
        shape = []
        for axis, want in enumerate(at_least):
            # outputs grow by at most the alignment per step of the input, so
            # a valid one, if any, lies within this many inputs
            first = self._min_input(axis)
            last = first + want + self.context[axis] + 64 * self.alignment[axis]
            for n in range(first, last):
                out = self.axis_output(n, axis)
                if out is not None and out >= want and out % self.alignment[axis] == 0:
                    shape.append(out)
                    break
            else:
                raise ValueError(
                    f"no output of at least {want} voxels along axis {axis} is a multiple of the total "
                    f"downsampling {self.alignment[axis]}; block-wise prediction needs one (change the factors)"
                )
        return tuple(shape)
