"""One FSDP unit: the flat shard of a group of parameters, their gathered copy and its gradient reduction.

Groups. ``group`` is the shard group (all of the data-parallel group for ZeRO-3, a slice of it for
HSDP, the expert-data-parallel group for experts); ``replicate_group`` (HSDP) holds the ranks with the
same shard in the other shard groups: each gradient element is reduce-scattered within the shard group
and its shard then all-reduced across the replicate group, once per step. The reduced shard is divided
by ``divide_by`` (default: the shard group's size times the replicate group's, the number of replicas
averaged; experts divide by the dense data-parallel size, see ``fully_shard``; 1: sums, for a loop
that scales its loss instead): after the reduction, so the division touches 1/N of the gradient, and
folded into the cast to the shard's dtype where there is one (for a power-of-two divisor the same bits
as dividing before; the sums of fp32 or bf16 gradients of a few replicas stay far from overflow).

Layout. The unit's parameters, concatenated (row-major, in order) and padded with zeros to a multiple
of the group size ``N``, form a flat tensor of ``padded`` elements; rank ``r`` stores elements
``[r * padded / N, (r + 1) * padded / N)`` of it in ``flat``, in the parameters' own dtype (the master
copy). What the optimizer sees is one ``nn.Parameter`` per original parameter, its *piece*: a view of
``flat`` holding the part of that parameter this rank stores (possibly empty). Optimizers update
pieces in place, which updates ``flat``. A piece carries its parameter's :mod:`pstate.tags` (they
describe the original parameter: TP split, sequence parallel, expert, tied copy), so clipping and the
model-parallel gradient completions treat the piece as they would the parameter.

Gathered copy. ``full`` is a leaf tensor of ``padded`` elements in the compute dtype that requires
grad; each original parameter's attribute on its module is set (in the module's ``__dict__``, which
shadows the registered piece) to a view of ``full`` shaped like the parameter. Gathering all-gathers
``flat`` into ``full``'s storage; freeing resizes that storage to zero bytes. Views saved by autograd
in the forward point at the same storage, so the backward sees the parameters again once the unit is
gathered again. ``full`` is written through ``full.data``, which has its own version counter, so
autograd's saved-tensor checks do not fire.

Gradient. Every view's gradient accumulates into ``full.grad``; once autograd has finished with all
of them (``full``'s post-accumulate-grad hook), :meth:`FlatUnit.start_reduce` casts it to the
reduction dtype and reduce-scatters it (then, HSDP, all-reduces the shard); :meth:`PendingReduce.finish`
divides this rank's part by ``divide_by`` and adds it into the pieces' ``.grad`` (accumulating across
backward passes like plain parameters).
Under ``no_sync`` :meth:`FlatUnit.stash_grad` keeps ``full.grad`` instead (in the reduction dtype,
summed over the passes) and the next reduction of the unit includes it: one reduce-scatter per step
whatever the number of micro-batches, at the price of the unit's unsharded gradient while a step runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pstate import comm
from pstate.tags import copy_tags

PIECE_ATTRIBUTE = "_dp_shard_fsdp_piece"  # set on the pieces, so that sharding them again is refused


@dataclass
class Slot:
    """One original parameter of a unit: its name, where it is an attribute, where it lies in the flat
    tensor, and this rank's piece (elements ``local`` of the flattened parameter)."""

    name: str
    owners: list[tuple[nn.Module, str]]
    shape: torch.Size
    start: int
    piece: nn.Parameter = field(repr=False)
    local: tuple[int, int]
    shard_offset: int  # where the piece starts inside this rank's flat shard

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass
class PendingReduce:
    """A gradient reduction in flight: the reduce-scatter over the shard group, then (HSDP) the all-reduce
    of this rank's shard over the replicate group. :meth:`replicate` waits for the first and starts the
    second; :meth:`finish` completes both and adds the result into the pieces' grads."""

    unit: FlatUnit
    work: Any
    out: torch.Tensor
    source: torch.Tensor | None = field(repr=False)  # kept alive until the reduce-scatter is done
    replicating: bool = False

    def replicate(self) -> None:
        """Wait for the reduce-scatter; with a replicate group, start the shard's all-reduce over it."""
        if self.replicating:
            return
        if self.work is not None:
            self.work.wait()
        self.work, self.source, self.replicating = None, None, True
        if self.unit.replicate_group is not None:
            self.work = comm.all_reduce(self.out, group=self.unit.replicate_group, async_op=True)

    def finish(self) -> None:
        self.replicate()
        if self.work is not None:
            self.work.wait()
        out, dtype, divisor = self.out, self.unit.flat.dtype, self.unit.divide_by
        if divisor == 1:
            out = out.to(dtype)
        elif out.dtype == dtype:  # the shard only: 1/N of the gradient
            out = out.div_(divisor)
        else:  # folded into the cast
            out = torch.div(out, divisor, out=torch.empty_like(out, dtype=dtype))
        for slot in self.unit.slots:
            size = slot.local[1] - slot.local[0]
            part = out[slot.shard_offset : slot.shard_offset + size]
            if slot.piece.grad is None:
                slot.piece.grad = part
            else:
                slot.piece.grad.add_(part)


class FlatUnit:
    """The sharded storage of ``params`` (``(name, owners, parameter)``, all of one dtype) over ``group``."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        params: Sequence[tuple[str, list[tuple[nn.Module, str]], nn.Parameter]],
        *,
        group: dist.ProcessGroup,
        param_dtype: torch.dtype | None,
        reduce_dtype: torch.dtype | None,
        replicate_group: dist.ProcessGroup | None = None,
        divide_by: int | None = None,
    ) -> None:
        self.name, self.module, self.group, self.replicate_group = name, module, group, replicate_group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        replicas = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.divide_by = divide_by or self.size * replicas  # the gradient is the mean over every replica
        first = params[0][2]
        self.dtype, self.device = first.dtype, first.device
        self.compute_dtype = param_dtype or self.dtype
        self.reduce_dtype = reduce_dtype
        total = sum(p.numel() for _, _, p in params)
        self.padded = -(-total // self.size) * self.size
        self.shard_numel = self.padded // self.size
        low, high = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        self.flat = torch.zeros(self.shard_numel, dtype=self.dtype, device=self.device)
        self.slots: list[Slot] = []
        start = 0
        with torch.no_grad():
            for pname, owners, param in params:
                a, b = max(start, low), min(start + param.numel(), high)
                if a >= b:  # none of this parameter lies in this rank's range: an empty piece
                    a = b = min(max(start, low), high)
                local = (a - start, b - start) if a < b else (0, 0)
                self.flat[a - low : b - low].copy_(param.detach().reshape(-1)[local[0] : local[1]])
                piece = nn.Parameter(self.flat[a - low : b - low], requires_grad=True)
                setattr(piece, PIECE_ATTRIBUTE, True)
                copy_tags(param, piece)
                self.slots.append(Slot(pname, owners, param.shape, start, piece, local, a - low))
                start += param.numel()
        self.full = torch.empty(self.padded, dtype=self.compute_dtype, device=self.device, requires_grad=True)
        self._full_bytes = self.full.untyped_storage().nbytes()
        self._gather_work: Any = None
        self._gather_source: torch.Tensor | None = None
        self.unsharded_grad: torch.Tensor | None = None  # gradients kept under no_sync, not reduced yet
        for slot in self.slots:  # register the pieces, then shadow them with full-size views
            for owner, attr in slot.owners:
                owner._parameters[attr] = slot.piece
        with torch.no_grad():  # views can only be taken while the storage is allocated
            self.install_views()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def install_views(self) -> None:
        """Point each original attribute at its view of ``full`` (tracked by autograd when grad is on)."""
        for slot in self.slots:
            view = self.full[slot.start : slot.start + slot.numel].view(slot.shape)
            for owner, attr in slot.owners:
                owner.__dict__[attr] = view

    def gather(self, *, async_op: bool) -> None:
        """Start (or, without ``async_op``, complete) the all-gather of ``flat`` into ``full``."""
        if self.gathered:
            if not async_op:
                self.wait()
            return
        self.full.untyped_storage().resize_(self._full_bytes)
        source = self.flat if self.compute_dtype == self.dtype else self.flat.to(self.compute_dtype)
        work = comm.all_gather(self.full.data, source, group=self.group, async_op=async_op)
        self.gathered = True
        if async_op:
            self._gather_work, self._gather_source = work, source

    def wait(self) -> None:
        """Wait for a gather started with ``async_op=True``."""
        if self._gather_work is not None:
            self._gather_work.wait()
            self._gather_work = self._gather_source = None

    def free(self) -> None:
        """Release the gathered copy (its storage goes down to zero bytes)."""
        if not self.gathered:
            return
        self.wait()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    def stash_grad(self) -> None:
        """Keep ``full.grad`` (added to what earlier passes kept) for the next reduction; free the copy."""
        grad, self.full.grad = self.full.grad, None
        if grad is not None:
            grad = grad.to(self.reduce_dtype or grad.dtype)
            if self.unsharded_grad is None:
                self.unsharded_grad = grad
            else:
                self.unsharded_grad.add_(grad)
        self.free()

    def start_reduce(self) -> PendingReduce:
        """Take ``full.grad`` (plus what ``no_sync`` kept), start its reduce-scatter (summing; the finish
        divides the shard) and free the gathered copy."""
        grad, self.full.grad = self.full.grad, None
        kept, self.unsharded_grad = self.unsharded_grad, None
        if grad is None:
            grad = kept
        dtype = self.reduce_dtype or grad.dtype
        source = grad.to(dtype)
        if kept is not None and kept is not grad:
            source = source + kept if source is grad else source.add_(kept)
        out = torch.empty(self.shard_numel, dtype=dtype, device=self.device)
        work = comm.reduce_scatter(out, source, group=self.group, async_op=True)
        self.free()
        return PendingReduce(self, work, out, source)
