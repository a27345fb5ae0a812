"""Pieces of a tensor as boxes of the global tensor, and their intersections.

A rectangular piece is one box. A flat piece (the range ``[start, stop)`` of the row-major flattening
of its rectangle, as ZeRO shards are) is a union of at most ``2*ndim - 1`` boxes, each a contiguous
run of the flat data. Reducing everything to boxes makes any saved layout loadable into any other.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


class BoxIndex:
    """Saved boxes (each with its piece) sorted along dimension 0, to find those a box meets without
    looking at the others: a requested box costs a bisection and the boxes it meets."""

    def __init__(self, entries: Sequence[tuple[Any, Box]]):
        order = sorted(range(len(entries)), key=lambda i: entries[i][1].offsets[:1])
        self._entries = [(i, *entries[i]) for i in order]
        self._starts = [b.offsets[0] if b.offsets else 0 for _, _, b in self._entries]
        self._longest = max((b.shape[0] if b.shape else 1 for _, _, b in self._entries), default=0)

    def meeting(self, want: Box) -> list[tuple[Any, Box, tuple[Shape, Shape]]]:
        """``(piece, box, common region)`` of every saved box that meets ``want``, in the given order."""
        if want.offsets:
            lo = bisect.bisect_right(self._starts, want.offsets[0] - self._longest)
            hi = bisect.bisect_left(self._starts, want.offsets[0] + want.shape[0])
        else:
            lo, hi = 0, len(self._entries)
        hits = []
        for i, piece, have in self._entries[lo:hi]:
            common = intersect(want, have)
            if common is not None:
                hits.append((i, piece, have, common))
        hits.sort(key=lambda h: h[0])
        return [(piece, have, common) for _, piece, have, common in hits]


def covers(want: Box, regions: Sequence[tuple[Shape, Shape]]) -> int:
    """How many elements of ``want`` none of ``regions`` (each inside it) covers."""
    total = sum(math.prod(shape) for _, shape in regions)
    if total == want.numel and len(regions) <= 64 and not _overlapping(regions):
        return 0
    covered = torch.zeros(want.shape, dtype=torch.bool)
    for offsets, shape in regions:
        covered[local_slices(want, offsets, shape)] = True
    return int((~covered).sum())


def _overlapping(regions: Sequence[tuple[Shape, Shape]]) -> bool:
    boxes_ = [Box(o, s) for o, s in regions]
    return any(intersect(a, b) is not None for i, a in enumerate(boxes_) for b in boxes_[i + 1 :])
