"""Autograd-aware collectives between a replicated region and a tensor-parallel region.

Each function takes its group explicitly and is differentiable: its backward is the conjugate collective.

==================================  ============================  ==============================
function                            forward                       backward
==================================  ============================  ==============================
``copy_to_region``                  identity                      all-reduce
``reduce_from_region``              all-reduce                    identity
``scatter_to_region``               keep own slice, last dim      all-gather, last dim
``gather_from_region``              all-gather, last dim          keep own slice, last dim
``scatter_to_sequence_region``      keep own slice, dim 0         all-gather, dim 0
``gather_from_sequence_region``     all-gather, dim 0             reduce-scatter, dim 0
``reduce_scatter_to_sequence_region``  reduce-scatter, dim 0      all-gather, dim 0
==================================  ============================  ==============================

Sequence-parallel activations are ``[seq/tp, batch, hidden]``; dimension 0 is the sequence. A split of a
size that does not divide raises :class:`~tp_layers.TensorParallelError`; so does a gather of pieces of
unequal sizes (checked with one small all-reduce; the layers, whose pieces are equal by construction,
skip that check).
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        comm.all_reduce(grad, ctx.group)
        return grad, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        comm.all_reduce(out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    """Keep this rank's slice along ``dim``; backward gathers the slices."""

    @staticmethod
    def forward(ctx, x, dim, group, what):
        ctx.dim, ctx.group = dim, group
        return comm.split(x, dim, group, what)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.dim, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """Concatenate every rank's slice along ``dim``; backward keeps this rank's slice of the gradient,
    summed over the group first when ``reduce_grad`` (the consumer of the gathered tensor is itself split)."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad, what):
        ctx.dim, ctx.group, ctx.reduce_grad, ctx.what = dim, group, reduce_grad, what
        return comm.all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return comm.reduce_scatter(grad, ctx.dim, ctx.group, ctx.what), None, None, None, None
        return comm.split(grad, ctx.dim, ctx.group, ctx.what), None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, what):
        ctx.dim, ctx.group = dim, group
        return comm.reduce_scatter(x, dim, group, what)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.dim, ctx.group), None, None, None


def copy_to_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient backward."""
    return _Copy.apply(x, group) if comm.size_of(group) > 1 else x


def reduce_from_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return _Reduce.apply(x, group) if comm.size_of(group) > 1 else x


def scatter_to_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; the gradient is all-gathered back."""
    if comm.size_of(group) == 1:
        return x
    return _Split.apply(x, -1, group, "scatter_to_region")


def gather_from_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """All-gather the last dimension; the gradient is split back to this rank's slice."""
    if comm.size_of(group) == 1:
        return x
    comm.check_same_size(x, -1, group, "gather_from_region")
    return _Gather.apply(x, -1, group, False, "gather_from_region")


def scatter_to_sequence_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dimension 0); the gradient is all-gathered back."""
    if comm.size_of(group) == 1:
        return x
    return _Split.apply(x, 0, group, "scatter_to_sequence_region")


def gather_from_sequence_region(x: torch.Tensor, *, group: Group, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence (dimension 0). Backward reduce-scatters the gradient, because the gathered
    tensor feeds a TP-split computation whose gradients are partial sums; with ``reduce_grad=False``
    (the gathered tensor is used identically on every rank) backward only keeps this rank's slice."""
    if comm.size_of(group) == 1:
        return x
    comm.check_same_size(x, 0, group, "gather_from_sequence_region")
    return _Gather.apply(x, 0, group, reduce_grad, "gather_from_sequence_region")


def gather_sequence_unchecked(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """:func:`gather_from_sequence_region` without the size check, for the layers, whose pieces are equal
    by construction (the check costs an all-reduce and a host synchronization)."""
    if comm.size_of(group) == 1:
        return x
    return _Gather.apply(x, 0, group, True, "gather_from_sequence_region")


def reduce_scatter_to_sequence_region(x: torch.Tensor, *, group: Group) -> torch.Tensor:
    """Sum partial results over the group and keep this rank's slice of the sequence (dimension 0);
    the gradient is all-gathered back."""
    if comm.size_of(group) == 1:
        return x
    return _ReduceScatter.apply(x, 0, group, "reduce_scatter_to_sequence_region")
