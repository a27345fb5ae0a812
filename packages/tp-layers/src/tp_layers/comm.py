"""Raw collectives on one dimension of a tensor over a TP group: the only place that calls torch.distributed.

Each returns a new tensor (or a handle to wait on, with ``async_op=True``). Sizes are checked here so that
a tensor that cannot be split evenly fails with a message naming the dimension, the size and the group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pstate import Group, as_group, comm

from .errors import TensorParallelError


def size_of(group: Group) -> int:
    """The number of ranks in ``group``."""
    return dist.get_world_size(as_group(group))


def rank_in(group: Group) -> int:
    """This process's rank within ``group``."""
    return dist.get_rank(as_group(group))


def check_divisible(x: torch.Tensor, dim: int, parts: int, what: str) -> int:
    """``x.size(dim) // parts``, or a :class:`TensorParallelError` naming ``what`` when it does not divide."""
    size = x.size(dim)
    if size % parts:
        raise TensorParallelError(
            f"{what}: dimension {dim % x.dim()} of shape {tuple(x.shape)} has size {size}, "
            f"which does not divide evenly over {parts} tensor-parallel ranks"
        )
    return size // parts


def split(x: torch.Tensor, dim: int, group: Group, what: str) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (no communication)."""
    parts = size_of(group)
    chunk = check_divisible(x, dim, parts, what)
    return x.narrow(dim, rank_in(group) * chunk, chunk).contiguous()


def all_reduce(
    x: torch.Tensor, group: Group, *, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, async_op: bool = False
) -> dist.Work | None:
    """Reduce ``x`` in place over ``group`` (a sum unless ``op`` says otherwise)."""
    return comm.all_reduce(x, op=op, group=group, async_op=async_op)


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``."""
    out, work = all_gather_async(x, group)
    work.wait()
    return _move_first_to(out, dim, size_of(group))


def check_same_size(x: torch.Tensor, dim: int, group: Group, what: str) -> None:
    """Raise :class:`TensorParallelError` on every rank unless all ranks' ``x`` have the same size along
    ``dim`` (one small all-reduce): a gather of unequal pieces would otherwise abort the process or hang."""
    size = x.size(dim)
    bounds = torch.tensor([size, -size], dtype=torch.int64, device=x.device)
    all_reduce(bounds, group, op=dist.ReduceOp.MAX)
    largest, smallest = bounds[0].item(), -bounds[1].item()
    if largest != smallest:
        raise TensorParallelError(
            f"{what}: dimension {dim % x.dim()} has size {size} on this rank but sizes from {smallest} to "
            f"{largest} across the {size_of(group)} tensor-parallel ranks; every rank must hold an equal piece"
        )


def all_gather_async(x: torch.Tensor, group: Group) -> tuple[torch.Tensor, dist.Work]:
    """Start gathering every rank's ``x`` along dimension 0; returns the output and the handle to wait on."""
    parts = size_of(group)
    out = x.new_empty((x.size(0) * parts, *x.shape[1:]))
    work = comm.all_gather(out, x.contiguous(), group=group, async_op=True)
    return out, work


def reduce_scatter(x: torch.Tensor, dim: int, group: Group, what: str, *, scratch: bool = False) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's slice along ``dim``; ``scratch``: ``x`` is the
    caller's own temporary and may be overwritten (see :func:`reduce_scatter_async`)."""
    out, work = reduce_scatter_async(_move_to_first(x, dim), group, what, scratch=scratch and dim % x.dim() == 0)
    work.wait()
    return out.movedim(0, dim) if dim % x.dim() else out


def reduce_scatter_async(
    x: torch.Tensor, group: Group, what: str, *, scratch: bool = False
) -> tuple[torch.Tensor, dist.Work]:
    """Start summing ``x`` over ``group`` keeping this rank's slice of dimension 0; output and handle.
    ``scratch``: ``x`` is a temporary the caller no longer needs; the backend may sum in it in place
    (gloo, whose reduce-scatter would otherwise copy all of it first: ``pstate.comm.reduce_scatter``)."""
    chunk = check_divisible(x, 0, size_of(group), what)
    out = x.new_empty((chunk, *x.shape[1:]))
    work = comm.reduce_scatter(out, x.contiguous(), group=group, async_op=True, scratch_input=scratch)
    return out, work


def _move_to_first(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, 0) if dim % x.dim() else x


def _move_first_to(gathered: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """Turn a dimension-0 gather of ``parts`` equal pieces into a concatenation along ``dim``."""
    if dim % gathered.dim() == 0:
        return gathered
    return torch.cat(gathered.chunk(parts, dim=0), dim=dim)
