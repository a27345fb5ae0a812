"""Tags on parameters that other packages read: how a parameter is split over TP, and whether its
gradient is a partial sum over the TP group because the layer sees only part of the sequence.

The tags themselves are :mod:`pstate.tags` (so ``dp-shard``, ``ckpt`` and ``trainer`` read them without
importing this package); this module adds the module-level helpers TP code needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pstate import Group, tags
from pstate.tags import is_sequence_parallel, mark_tensor_parallel, tensor_parallel_dim

from . import comm

__all__ = [
    "allreduce_sequence_parallel_grads",
    "is_sequence_parallel",
    "mark_sequence_parallel",
    "mark_tensor_parallel",
    "reduce_sequence_parallel_grads_in_backward",
    "sequence_parallel_params",
    "tensor_parallel_dim",
]


def mark_sequence_parallel(params: nn.Module | nn.Parameter | Iterable[nn.Parameter]) -> None:
    """Tag parameters that are replicated over TP but used on a sequence shard (the norms, and the bias
    of a row-parallel layer under sequence parallelism): each rank's gradient is then a partial sum,
    and :func:`allreduce_sequence_parallel_grads` completes it. Accepts a module (all its parameters),
    one parameter or an iterable of them."""
    for param in _as_params(params):
        tags.mark_sequence_parallel(param)


def sequence_parallel_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` tagged as sequence parallel, in registration order."""
    return (p for p in module.parameters() if is_sequence_parallel(p))


def allreduce_sequence_parallel_grads(params: nn.Module | Iterable[nn.Parameter], *, group: Group) -> None:
    """Sum the gradients of the sequence-parallel parameters over the TP ``group``, in one collective.

    Call it after backward and before the data-parallel reduction and the optimizer step. Given a module,
    only its tagged parameters are reduced; given parameters, all of those with a gradient are.
    """
    if isinstance(params, nn.Module):
        params = sequence_parallel_params(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or comm.size_of(group) == 1:
        return
    for kind in dict.fromkeys((g.dtype, g.device) for g in grads):
        same = [g for g in grads if (g.dtype, g.device) == kind]
        flat = torch.cat([g.reshape(-1) for g in same])
        comm.all_reduce(flat, group)
        for grad, piece in zip(same, flat.split([g.numel() for g in same])):
            grad.copy_(piece.view_as(grad))


def reduce_sequence_parallel_grads_in_backward(module: nn.Module, *, group: Group) -> list[Any]:
    """Sum the gradients of ``module``'s sequence-parallel parameters over the TP ``group`` as backward
    produces them (a hook on each parameter), instead of after backward.

    Each parameter's gradient then arrives complete, so it works under any wrapper that takes gradients
    during backward (a sharded optimizer's reduce-scatter, FSDP) and with split I/W backwards. It costs
    one small all-reduce per parameter per backward, where :func:`allreduce_sequence_parallel_grads`
    costs one per step. Every TP rank runs the same backward, so the all-reduces match. Returns the hook
    handles (``handle.remove()`` undoes it).
    """
    if comm.size_of(group) == 1:
        return []

    def complete(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        comm.all_reduce(grad, group)
        return grad

    return [p.register_hook(complete) for p in sequence_parallel_params(module)]


def _as_params(params: nn.Module | nn.Parameter | Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    if isinstance(params, nn.Module):
        return params.parameters()
    if isinstance(params, torch.Tensor):
        return [params]
    return params
