"""Contiguous gradient buffers split into buckets: the storage under DDP, reusable by ZeRO-2/3.

A :class:`GradBuffer` holds the gradients of a list of parameters (all of one gradient dtype) in one flat
tensor, in the order given (DDP passes backward order, so buckets fill up one after another during
backward). The flat tensor is cut into :class:`Bucket` s of about ``bucket_numel`` elements; a parameter
never straddles two buckets, and one larger than ``bucket_numel`` gets a bucket of its own. With
``alone`` (ids of parameters) each get a bucket of their own, starting at a bucket boundary. With
``align=N`` every bucket's length is padded to a multiple of ``N`` (the padding is zero and belongs to no
parameter), so a bucket splits evenly into ``N`` shards: what a reduce-scatter over a group of ``N``
needs (:meth:`Bucket.shard`). On the ``meta`` device a buffer is a layout only (no memory): ZeRO-2 uses
that to place its gradient shards without holding the full gradient.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    """A slice ``[start, end)`` of its buffer's flat tensor holding the gradients of ``params``."""

    index: int
    params: list[torch.nn.Parameter]
    start: int
    end: int
    data: torch.Tensor = field(repr=False)

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard(self, rank: int, size: int) -> torch.Tensor:
        """The ``rank``-th of ``size`` equal pieces of this bucket (a view); needs ``align`` % size == 0."""
        if self.numel % size:
            raise ValueError(f"bucket {self.index} of {self.numel} elements does not split into {size} shards")
        piece = self.numel // size
        return self.data[rank * piece : (rank + 1) * piece]


class GradBuffer:
    """One flat gradient tensor of ``dtype`` on ``device`` for ``params`` (in that order), in buckets."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        dtype: torch.dtype,
        bucket_numel: int,
        align: int = 1,
        device: torch.device | None = None,
        alone: Collection[int] = (),
    ) -> None:
        if not params:
            raise ValueError("a GradBuffer needs at least one parameter")
        if bucket_numel < 1 or align < 1:
            raise ValueError(f"bucket_numel={bucket_numel} and align={align} must be >= 1")
        self.dtype = dtype
        self.device = params[0].device if device is None else torch.device(device)
        self.params = list(params)
        self._offsets: dict[int, tuple[int, int]] = {}
        spans: list[tuple[list[torch.nn.Parameter], int, int]] = []
        start = offset = 0
        members: list[torch.nn.Parameter] = []
        for param in self.params:
            if id(param) in alone and members:  # close the open bucket first
                offset = _round_up(offset, align)
                spans.append((members, start, offset))
                start, members = offset, []
            self._offsets[id(param)] = (offset, offset + param.numel())
            offset += param.numel()
            members.append(param)
            if offset - start >= bucket_numel or id(param) in alone:
                offset = _round_up(offset, align)
                spans.append((members, start, offset))
                start, members = offset, []
        if members:
            offset = _round_up(offset, align)
            spans.append((members, start, offset))
        self.numel = offset
        self.data = torch.zeros(offset, dtype=dtype, device=self.device)
        self.buckets = [Bucket(i, m, s, e, self.data[s:e]) for i, (m, s, e) in enumerate(spans)]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}

    def span(self, param: torch.nn.Parameter) -> tuple[int, int]:
        """The range ``[start, end)`` of the flat buffer that holds ``param``'s gradient."""
        return self._offsets[id(param)]

    def view(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The slice of the buffer that holds ``param``'s gradient, shaped like ``param``."""
        start, end = self._offsets[id(param)]
        return self.data[start:end].view(param.shape)

    def bucket_of(self, param: torch.nn.Parameter) -> Bucket:
        """The bucket that holds ``param``'s gradient."""
        return self._bucket_of[id(param)]

    def zero_(self) -> None:
        """Zero every gradient (and the padding)."""
        self.data.zero_()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
