"""All-to-all between sequence-sharded and hidden/head-sharded layouts, as autograd functions.

The backward of an all-to-all that scatters dimension ``a`` and gathers dimension ``b`` is the all-to-all
that scatters ``b`` and gathers ``a``. The gathered dimension comes out in group-rank order, which is the
global order for contiguous sequence placement.
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm
from .errors import ContextParallelError


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):  # type: ignore[override]
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return comm.all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scatter_dim, gather_dim = ctx.dims
        return comm.all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, *, scatter_dim: int, gather_dim: int, group: Group, what: str) -> torch.Tensor:
    """Differentiable all-to-all: split ``scatter_dim`` over the group, concatenate ``gather_dim``."""
    cp, _ = comm.size_and_rank(group)
    if x.size(scatter_dim) % cp:
        raise ContextParallelError(
            f"{what}: dimension {scatter_dim % x.dim()} of shape {tuple(x.shape)} has size {x.size(scatter_dim)}, "
            f"which does not divide evenly over cp={cp} ranks"
        )
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def all_to_all_sp2hp(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """``[seq/cp, batch, hidden]`` (sequence-sharded, contiguous placement) -> ``[seq, batch, hidden/cp]``
    (hidden-sharded: group rank ``r`` holds hidden slice ``r``). Megatron's sequence-to-hidden exchange for
    all-to-all context parallelism in state-space layers; the backward is :func:`all_to_all_hp2sp`."""
    _check_3d(x, "all_to_all_sp2hp")
    return all_to_all(x, scatter_dim=-1, gather_dim=0, group=group, what="all_to_all_sp2hp")


def all_to_all_hp2sp(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """``[seq, batch, hidden/cp]`` -> ``[seq/cp, batch, hidden]``: the inverse of :func:`all_to_all_sp2hp`."""
    _check_3d(x, "all_to_all_hp2sp")
    return all_to_all(x, scatter_dim=0, gather_dim=-1, group=group, what="all_to_all_hp2sp")


def _check_3d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 3:
        raise ContextParallelError(f"{what}: expected a [seq, batch, hidden] tensor, got shape {tuple(x.shape)}")
