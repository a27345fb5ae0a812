"""``Shard``: this rank's piece of a tensor split across ranks, described in the full tensor's frame.

Packages that split state (``tp-layers`` weights, ``dp-shard`` optimizer state, ``moe-dispatch``
experts) describe their pieces with it, and ``ckpt`` saves and reloads them in any other layout. It
lives here because those packages cannot import each other.

A piece is a rectangle of the global tensor: ``offsets`` and ``shape`` inside ``global_shape``. A
ZeRO shard of a flattened parameter is not a rectangle, so a piece may also be the range
``flat_range = (start, stop)`` of the row-major flattening of its rectangle; ``data`` then holds
``stop - start`` elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """``data`` is the part of a ``global_shape`` tensor at ``offsets`` (of extent ``shape``).

    ``shape`` defaults to ``data.shape``. With ``flat_range``, ``data`` is 1-D and holds elements
    ``start:stop`` of the flattened rectangle.
    """

    data: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...] | None = None
    flat_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        g = tuple(int(s) for s in self.global_shape)
        o = tuple(int(s) for s in self.offsets)
        shape = tuple(self.data.shape) if self.shape is None else tuple(int(s) for s in self.shape)
        object.__setattr__(self, "global_shape", g)
        object.__setattr__(self, "offsets", o)
        object.__setattr__(self, "shape", shape)
        if not len(g) == len(o) == len(shape):
            raise ValueError(f"Shard: global_shape {g}, offsets {o} and shape {shape} differ in rank")
        for d, (n, off, size) in enumerate(zip(g, o, shape)):
            if off < 0 or size < 0 or off + size > n:
                raise ValueError(f"Shard: dimension {d} holds [{off}, {off + size}) outside the global size {n}")
        if self.flat_range is None:
            if tuple(self.data.shape) != shape:
                raise ValueError(f"Shard: data of shape {tuple(self.data.shape)} is not the shape {shape}")
            return
        start, stop = (int(v) for v in self.flat_range)
        object.__setattr__(self, "flat_range", (start, stop))
        if not 0 <= start <= stop <= math.prod(shape):
            raise ValueError(f"Shard: flat_range {(start, stop)} is outside a rectangle of shape {shape}")
        if self.data.dim() != 1 or self.data.numel() != stop - start:
            raise ValueError(f"Shard: flat data must be 1-D with {stop - start} elements, got {tuple(self.data.shape)}")

    def within(self, global_shape: tuple[int, ...], offsets: tuple[int, ...]) -> Shard:
        """This shard, described so far inside one piece, moved into the tensor that piece sits in.

        For example an optimizer state described against a rank's TP slice of a weight (its own frame)
        becomes a piece of the full weight: ``state.within(full_shape, slice_offsets)``.
        """
        if len(global_shape) != len(self.global_shape) or len(offsets) != len(self.offsets):
            raise ValueError(f"Shard.within: {tuple(global_shape)} and {self.global_shape} differ in rank")
        moved = tuple(o + p for o, p in zip(self.offsets, offsets))
        return Shard(self.data, tuple(global_shape), moved, self.shape, self.flat_range)


def tensor_parallel_shard(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> Shard:
    """The ``Shard`` of a tensor split evenly along ``dim`` over ``size`` ranks (``None``: replicated)."""
    shape = tuple(tensor.shape)
    if dim is None:
        return Shard(tensor, shape, (0,) * len(shape))
    global_shape = tuple(n * size if d == dim else n for d, n in enumerate(shape))
    offsets = tuple(rank * shape[dim] if d == dim else 0 for d in range(len(shape)))
    return Shard(tensor, global_shape, offsets)
