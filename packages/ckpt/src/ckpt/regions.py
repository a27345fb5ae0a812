"""Pieces of a tensor as boxes of the global tensor, and their intersections.

A rectangular piece is one box. A flat piece (the range ``[start, stop)`` of the row-major flattening
of its rectangle, as ZeRO shards are) is a union of at most ``2*ndim - 1`` boxes, each a contiguous
run of the flat data. Reducing everything to boxes makes any saved layout loadable into any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """``shape`` at ``offsets`` of the global tensor; for a flat piece, its data starts at ``flat``."""

    offsets: Shape
    shape: Shape
    flat: int | None = None  # position in the piece's 1-D data, None for a rectangular piece

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def boxes(offsets: Shape, shape: Shape, flat_range: tuple[int, int] | None) -> list[Box]:
    """The non-empty boxes of a piece, in the global frame."""
    if flat_range is None:
        return [Box(tuple(offsets), tuple(shape))] if math.prod(shape) else []
    start, stop = flat_range
    return [
        Box(tuple(o + p for o, p in zip(offsets, local)), size, pos - start)
        for local, size, pos in _flat_boxes(tuple(shape), start, stop)
    ]


def _flat_boxes(shape: Shape, start: int, stop: int) -> list[tuple[Shape, Shape, int]]:
    """Boxes ``(offsets, shape, flat position)`` covering ``[start, stop)`` of a ``shape`` rectangle."""
    if start >= stop:
        return []
    if not shape:
        return [((), (), start)]
    inner = math.prod(shape[1:])
    first, head = divmod(start, inner)
    last, tail = divmod(stop, inner)
    rest = (0,) * (len(shape) - 1)

    def row(i: int, lo: int, hi: int) -> list[tuple[Shape, Shape, int]]:
        return [((i, *o), (1, *s), i * inner + p) for o, s, p in _flat_boxes(shape[1:], lo, hi)]

    if head and first == last:
        return row(first, head, tail)
    out = []
    if head:
        out += row(first, head, inner)
        first += 1
    if last > first:
        out.append(((first, *rest), (last - first, *shape[1:]), first * inner))
    if tail:
        out += row(last, 0, tail)
    return out


def intersect(a: Box, b: Box) -> tuple[Shape, Shape] | None:
    """The common ``(offsets, shape)`` of two boxes, or ``None`` when they do not meet."""
    lo = tuple(max(x, y) for x, y in zip(a.offsets, b.offsets))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a.offsets, a.shape, b.offsets, b.shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def local_slices(box: Box, offsets: Shape, shape: Shape) -> tuple[slice, ...]:
    """Slices selecting the region ``(offsets, shape)`` inside ``box``'s own data."""
    return tuple(slice(o - b, o - b + n) for o, b, n in zip(offsets, box.offsets, shape))


def box_view(data: torch.Tensor, box: Box) -> torch.Tensor:
    """A view of ``box`` inside a piece's data (for writing into it in place)."""
    if box.flat is None:
        return data
    run = data.narrow(0, box.flat, box.numel)
    return run[0] if not box.shape else run.unflatten(0, box.shape)
