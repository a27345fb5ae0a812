"""Group helpers and the raw exchanges of ``cp_ring``: the only module that calls torch.distributed.

Every function takes a ``pstate.Group`` (an ``Axis`` or a ``ProcessGroup``) or the process group behind it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pstate import Group, as_group, comm

from .errors import ContextParallelError


def size_and_rank(group: Group) -> tuple[int, int]:
    """The number of ranks in ``group`` and this process's rank within it."""
    pg = as_group(group)
    return dist.get_world_size(pg), dist.get_rank(pg)


def check_divisible(size: int, parts: int, what: str) -> int:
    """``size // parts``, or a :class:`ContextParallelError` naming ``what`` when it does not divide."""
    if parts < 1 or size % parts:
        raise ContextParallelError(f"{what} has size {size}, which does not divide evenly into {parts} parts")
    return size // parts


class RingPeers:
    """The global ranks of this rank's ring neighbours in ``group``: it sends to ``next`` and receives
    from ``prev`` (group rank ``r`` sends to ``r+1`` and receives from ``r-1``, modulo the group size)."""

    def __init__(self, group: Group) -> None:
        self.group = as_group(group)
        self.size, self.rank = size_and_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def shift(self, tensors: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], list[dist.Work]]:
        """Start sending each tensor to ``next`` while receiving a tensor of the same shape and dtype from
        ``prev``; returns the receive buffers (by the same keys) and the requests to wait on. The keys are
        the message tags, so that two messages to the same peer cannot be matched the wrong way round."""
        if not tensors:
            return {}, []
        ops, received = [], {}
        for tag, tensor in tensors.items():
            buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, buffer, self.prev, self.group, tag))
            received[tag] = buffer
        return received, comm.batch_isend_irecv(ops)


def wait_all(requests: list[dist.Work]) -> None:
    """Wait for every request of one :meth:`RingPeers.shift`."""
    for request in requests:
        request.wait()


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Group) -> torch.Tensor:
    """Cut ``x`` into ``cp`` equal pieces along ``scatter_dim``, send piece ``j`` to group rank ``j``, and
    concatenate the pieces received (in group-rank order) along ``gather_dim``. Not differentiable by
    itself; :mod:`cp_ring.all_to_all` wraps it."""
    pg = as_group(group)
    parts = dist.get_world_size(pg)
    if parts == 1:
        return x
    send = torch.stack(x.chunk(parts, scatter_dim))  # [parts, ...]: piece j goes to rank j
    received = torch.empty_like(send)
    comm.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_gather(x: torch.Tensor, dim: int, group: Group) -> list[torch.Tensor]:
    """Every rank's ``x`` (equal shapes), in group-rank order."""
    pg = as_group(group)
    pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(pg))]
    comm.all_gather_list(pieces, x.contiguous(), group=group)
    return pieces


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of every rank's ``x`` (a new tensor; the portable form of a reduce-scatter on gloo)."""
    out = x.contiguous().clone()
    comm.all_reduce(out, group=group)
    return out
