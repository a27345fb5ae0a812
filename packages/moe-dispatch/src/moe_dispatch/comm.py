"""Collectives for the dispatchers, each an autograd function that takes its group.

``group`` is a ``pstate`` axis, a process group, or ``None`` for a single rank (no communication).
Row counts are plain Python lists agreed beforehand (see :func:`gather_counts`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pstate import Group, as_group, comm
from tp_layers import gather_from_sequence_region, reduce_scatter_to_sequence_region

GroupOrNone = Group | None


def size_of(group: GroupOrNone) -> int:
    """Ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(as_group(group))


def rank_in(group: GroupOrNone) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(as_group(group))


def gather_counts(counts: torch.Tensor, group: GroupOrNone) -> torch.Tensor:
    """Stack every rank's ``counts`` (an int64 tensor of equal shape on all ranks): ``[size, *shape]``."""
    if size_of(group) == 1:
        return counts.unsqueeze(0)
    out = counts.new_empty(size_of(group) * counts.numel())
    comm.all_gather(out, counts.contiguous().view(-1), group=group)
    return out.view(size_of(group), *counts.shape)


def all_gather_plain(x: torch.Tensor, group: GroupOrNone) -> torch.Tensor:
    """Concatenate every rank's equal-shaped ``x`` along dimension 0, without autograd."""
    if size_of(group) == 1:
        return x
    out = x.new_empty((x.size(0) * size_of(group), *x.shape[1:]))
    comm.all_gather(out, x.contiguous(), group=group)
    return out


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group: GroupOrNone) -> torch.Tensor:
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    comm.all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_rows, in_rows, group):
        ctx.rows, ctx.group = (out_rows, in_rows), group
        return _all_to_all(x, out_rows, in_rows, group)

    @staticmethod
    def backward(ctx, grad):
        out_rows, in_rows = ctx.rows
        return _all_to_all(grad, in_rows, out_rows, ctx.group), None, None, None


class _GatherUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, group):
        ctx.rows, ctx.group = rows, group
        parts = size_of(group)
        return _all_to_all(x.repeat(parts, *([1] * (x.dim() - 1))), rows, [x.size(0)] * parts, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_uneven(grad, ctx.rows, ctx.group), None, None


class _ReduceScatterUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, group):
        ctx.rows, ctx.group = rows, group
        return _reduce_scatter_uneven(x, rows, group)

    @staticmethod
    def backward(ctx, grad):
        parts = size_of(ctx.group)
        return (
            _all_to_all(grad.repeat(parts, *([1] * (grad.dim() - 1))), ctx.rows, [grad.size(0)] * parts, ctx.group),
            None,
            None,
        )


def _reduce_scatter_uneven(x: torch.Tensor, rows: list[int], group: GroupOrNone) -> torch.Tensor:
    parts, mine = size_of(group), rows[rank_in(group)]
    pieces = _all_to_all(x, [mine] * parts, rows, group)
    return pieces.view(parts, mine, *x.shape[1:]).sum(0)


def all_gather(x: torch.Tensor, group: GroupOrNone) -> torch.Tensor:
    """Concatenate equal pieces along dimension 0; backward reduce-scatters (sums) the gradient. The
    tp-layers sequence mapping, which also refuses unequal pieces on every rank."""
    return x if size_of(group) == 1 else gather_from_sequence_region(x, group=group)


def reduce_scatter(x: torch.Tensor, group: GroupOrNone) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's equal slice of dimension 0; backward all-gathers."""
    return x if size_of(group) == 1 else reduce_scatter_to_sequence_region(x, group=group)


def all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group: GroupOrNone) -> torch.Tensor:
    """Send ``in_rows[j]`` consecutive rows of ``x`` to rank ``j`` and receive ``out_rows[j]`` from it;
    backward sends the gradient back the same way."""
    return x if size_of(group) == 1 else _AllToAll.apply(x, out_rows, in_rows, group)


def gather_uneven(x: torch.Tensor, rows: list[int], group: GroupOrNone) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank ``j`` holds ``rows[j]`` rows) along dimension 0; backward
    sums the gradient over the group and keeps this rank's rows."""
    return x if size_of(group) == 1 else _GatherUneven.apply(x, rows, group)


def reduce_scatter_uneven(x: torch.Tensor, rows: list[int], group: GroupOrNone) -> torch.Tensor:
    """Sum ``x`` (``sum(rows)`` rows, equal shape on every rank) over the group and keep this rank's
    ``rows[rank]`` rows; backward is :func:`gather_uneven`."""
    return x if size_of(group) == 1 else _ReduceScatterUneven.apply(x, rows, group)


def regroup(x: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """Rows of ``x`` come in chunks ordered ``(a, b)`` with ``counts[a][b]`` rows each; return them
    ordered ``(b, a)``. The inverse is ``regroup(y, transpose(counts))``. Differentiable."""
    if len(counts) <= 1 or not counts[0]:
        return x
    flat = [c for row in counts for c in row]
    chunks = x.split(flat)
    width = len(counts[0])
    return torch.cat([chunks[a * width + b] for b in range(width) for a in range(len(counts))])


def transpose(counts: list[list[int]]) -> list[list[int]]:
    """The transposed nested list."""
    return [list(col) for col in zip(*counts)]
