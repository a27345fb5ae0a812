"""Split a full sequence into this CP rank's part, and put the parts back together.

Contiguous placement: rank ``i`` holds chunk ``i`` of ``cp`` equal chunks. Zigzag placement (the default,
for causal attention): the sequence is cut into ``2*cp`` chunks and rank ``i`` holds chunks ``i`` and
``2*cp-1-i``, in that order, so that every rank gets one early and one late chunk and does the same causal
work. Position ids and labels must go through the same function as the hidden states.
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm
from .errors import ContextParallelError


def _chunk_length(length: int, cp: int, zigzag: bool, what: str) -> int:
    parts = 2 * cp if zigzag else cp
    if length % parts:
        placement = f"2*cp={parts} zigzag chunks" if zigzag else f"cp={parts} contiguous chunks"
        raise ContextParallelError(
            f"{what} has length {length}, which does not divide into {placement} (cp={cp}); "
            f"pad the sequence to a multiple of {parts}"
        )
    return length // parts


def local_part(x: torch.Tensor, rank: int, cp: int, dim: int, zigzag: bool) -> torch.Tensor:
    """Rank ``rank``'s part of the full ``x`` along ``dim`` (no communication, differentiable)."""
    what = f"sequence dimension {dim} of shape {tuple(x.shape)}"
    chunk = _chunk_length(x.size(dim), cp, zigzag, what)
    if not zigzag:
        return x.narrow(dim, rank * chunk, chunk)
    return torch.cat([x.narrow(dim, rank * chunk, chunk), x.narrow(dim, (2 * cp - 1 - rank) * chunk, chunk)], dim)


def global_order(pieces: list[torch.Tensor], dim: int, zigzag: bool) -> torch.Tensor:
    """The full sequence from every rank's part (``pieces`` in group-rank order)."""
    if not zigzag:
        return torch.cat(pieces, dim)
    halves = [piece.chunk(2, dim) for piece in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def shard_sequence(x: torch.Tensor, *, group: Group, dim: int = 0, zigzag: bool = True) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` along ``dim`` (``0`` for ``[seq, batch, hidden]``, ``1``
    for ``[batch, seq]`` token ids or labels, ``2`` for the SDPA layout). No communication; differentiable.
    Raises :class:`ContextParallelError` when the length does not divide into ``2*cp`` chunks (zigzag) or
    ``cp`` chunks (contiguous)."""
    cp, rank = comm.size_and_rank(group)
    return local_part(x, rank, cp, dim, zigzag)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, zigzag, reduce_grad):  # type: ignore[override]
        ctx.group, ctx.dim, ctx.zigzag, ctx.reduce_grad = group, dim, zigzag, reduce_grad
        return global_order(comm.all_gather(x_local, dim, group), dim, zigzag)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.reduce_grad:
            grad = comm.all_reduce(grad, ctx.group)
        cp, rank = comm.size_and_rank(ctx.group)
        return local_part(grad, rank, cp, ctx.dim, ctx.zigzag), None, None, None, None


def unshard_sequence(
    x_local: torch.Tensor, *, group: Group, dim: int = 0, zigzag: bool = True, reduce_grad: bool = False
) -> torch.Tensor:
    """The full sequence on every rank: all-gathers the parts along ``dim`` and undoes the placement.

    Differentiable. The backward keeps this rank's part of the incoming gradient, which is right when every
    rank uses the gathered tensor in the same (replicated) way. When ranks use it differently (each computes
    a different part of a loss), pass ``reduce_grad=True`` to sum the gradients over the group first.
    All ranks' parts must have the same shape; with zigzag the local length must be even.
    """
    if zigzag and x_local.size(dim) % 2:
        raise ContextParallelError(
            f"sequence dimension {dim} of shape {tuple(x_local.shape)} has odd local length {x_local.size(dim)}; "
            "a zigzag part holds two equal chunks"
        )
    return _Unshard.apply(x_local, group, dim, zigzag, reduce_grad)
