"""One gradient-bucket scheduler for DDP and ZeRO-1/2: hooks, counters and launch order, with the
reduction (all-reduce, or reduce-scatter into this rank's shard) as a strategy object.

Each :class:`Slot` is one bucket of a :class:`~dp_shard.buffers.GradBuffer` layout with the group it is
reduced over, what averaging divides it by, and its *local* gradients: a persistent view of the layout's
buffer (DDP, ZeRO-1: autograd accumulates straight into it where the dtypes match) or a bucket-sized
staging tensor allocated when the bucket's first gradient arrives and freed once it is reduced (ZeRO-2).

A post-accumulate-grad hook adds each gradient into its bucket and counts the bucket's ready parameters;
with ``overlap`` a bucket's reduction starts once all of its parameters are ready *and* every earlier
bucket has started, so every rank issues the collectives in one order even when their backward passes
differ. :meth:`BucketScheduler.finish` starts the buckets still waiting (a parameter unused in this step
takes part with what its gradient holds: zeros, or its accumulation) and waits for all.
:meth:`~BucketScheduler.no_sync` accumulates without communicating, so each gradient element is reduced
once per step whatever the number of micro-batches. With ``finish_in_backward`` the first hook of a pass
queues an autograd-engine callback that finishes the reduction when the pass ends.

Averaging divides by ``divisor`` before the reduction (pre-division, as torch DDP does: the sum stays
in the range of the local gradients, and gloo has no AVG), folded into a pass over the gradients that
happens anyway, so it costs none of its own where there is one: a bucket whose gradients all arrive
through the hook (ZeRO-2's staging buckets, 16-bit parameters' fp32 main gradients) gets each gradient
added in times ``1/divisor``; a bucket the collective moves in another dtype (``reduce_dtype``) is
divided while it is cast. Only a bucket autograd accumulates into in place and that is reduced in its
own dtype (fp32 DDP / ZeRO-1) is divided by a pass of its own; a training loop that owns its loss
avoids that by scaling the loss instead and reducing sums (``average=False``; see
:attr:`~dp_shard.DataParallelEngine.loss_factor`). For a power-of-two divisor every way gives the same
bits (scaling by a power of two is exact); otherwise ``g * (1/d)`` may differ from ``g / d`` in the
last bit. ``reduce_dtype`` (default: the bucket's) is the dtype the collective moves: a bf16 reduction
of fp32 main gradients casts the bucket for the collective and adds the result back in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.autograd import Variable

from pstate import comm

from .buffers import Bucket, GradBuffer
from .errors import DataParallelError


@dataclass
class Slot:
    """One bucket with what reducing it needs: ``local`` gradients (``None``: a staging tensor not
    allocated yet), ``shard`` (ZeRO: where this rank's reduced piece goes) and ``params`` (ZeRO: the
    bucket's slice of the parameter buffer, for the all-gather)."""

    bucket: Bucket
    layout: GradBuffer
    group: dist.ProcessGroup
    divisor: int
    local: torch.Tensor | None
    shard: torch.Tensor | None = None
    params: torch.Tensor | None = None
    fresh: bool = True  # the shard holds nothing reduced since the last zero
    persistent: bool = True  # the local gradients are a view of the layout's buffer (not a staging tensor)

    def local_view(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s gradient within the bucket's local tensor, shaped like ``param``."""
        start, end = self.layout.span(param)
        return self.local[start - self.bucket.start : end - self.bucket.start].view(param.shape)

    def ensure_local(self) -> torch.Tensor:
        if self.local is None:
            self.local = torch.zeros(self.bucket.numel, dtype=self.layout.dtype, device=self.device)
        return self.local

    @property
    def device(self) -> torch.device:
        return self.shard.device if self.shard is not None else self.layout.device


class Reduction(Protocol):
    """How a bucket is reduced: :meth:`launch` starts the collective (async) on the local gradients
    divided by ``divisor`` (``None``: as they are) and returns what :meth:`complete` needs once it is
    waited."""

    def launch(self, slot: Slot, divisor: int | None) -> tuple[Any, Any]: ...

    def complete(self, slot: Slot, token: Any) -> None: ...


class AllReduce:
    """DDP: every rank gets the whole reduced bucket, in place."""

    def __init__(self, reduce_dtype: torch.dtype | None = None) -> None:
        self.reduce_dtype = reduce_dtype

    def launch(self, slot: Slot, divisor: int | None) -> tuple[Any, Any]:
        data = _prepare(slot.local, self.reduce_dtype, divisor)
        return comm.all_reduce(data, group=slot.group, async_op=True), data

    def complete(self, slot: Slot, data: torch.Tensor) -> None:
        if data is not slot.local:
            slot.local.copy_(data)


class ReduceScatter:
    """ZeRO-1/2: this rank's piece of the reduced bucket reaches ``slot.shard``. With ``use_all_reduce``
    (gloo, whose CPU reduce-scatter is slower than its all-reduce) the bucket is all-reduced and the own
    piece taken from it."""

    def __init__(self, *, use_all_reduce: bool, reduce_dtype: torch.dtype | None = None) -> None:
        self.use_all_reduce, self.reduce_dtype = use_all_reduce, reduce_dtype

    def launch(self, slot: Slot, divisor: int | None) -> tuple[Any, Any]:
        data = _prepare(slot.local, self.reduce_dtype, divisor)
        size, rank = dist.get_world_size(slot.group), dist.get_rank(slot.group)
        piece = slot.bucket.numel // size
        if self.use_all_reduce:
            return comm.all_reduce(data, group=slot.group, async_op=True), (data, data[rank * piece :][:piece])
        inside = _overlaps(slot.shard, slot.local)  # ZeRO-1: the shard is the own piece of the local bucket
        if inside and not slot.fresh:
            raise DataParallelError(
                "a second reduction of one step's gradients with reduce-scatter (ZeRO-1): run every backward "
                "but the last of a step inside no_sync(), and zero_grad() between steps"
            )
        direct = slot.fresh and data is slot.local and not inside
        out = slot.shard if direct else torch.empty(piece, dtype=data.dtype, device=data.device)
        return comm.reduce_scatter(out, data, group=slot.group, async_op=True), (data, out)

    def complete(self, slot: Slot, token: tuple[torch.Tensor, torch.Tensor]) -> None:
        data, out = token
        if self.use_all_reduce and slot.persistent:
            if data is not slot.local:
                slot.local.copy_(data)  # the whole reduced bucket, the shard (its own piece) included
            if _overlaps(slot.shard, slot.local):
                return
        if out is slot.shard:
            return
        if slot.fresh:
            slot.shard.copy_(out)
        else:
            slot.shard.add_(out)


class BucketScheduler:
    """Hooks, counters and launch order over ``slots`` (see the module notes). ``slots`` are in launch
    order (about backward order); ``reduction`` is the strategy."""

    def __init__(
        self,
        slots: Sequence[Slot],
        reduction: Reduction,
        *,
        overlap: bool = True,
        average: bool = True,
        finish_in_backward: bool = False,
    ) -> None:
        self.slots = list(slots)
        self.reduction, self.overlap, self.average = reduction, overlap, average
        self.finish_in_backward = finish_in_backward
        self._slot_of = {id(p): i for i, s in enumerate(self.slots) for p in s.bucket.params}
        self._views: dict[int, torch.Tensor] = {}  # id(param) -> its .grad view (persistent, same dtype)
        for slot in self.slots:
            for p in slot.bucket.params:
                if slot.persistent and p.dtype == slot.layout.dtype:
                    p.grad = self._views[id(p)] = slot.local_view(p)
        # id(param) -> (param, its .grad view), for the parameters whose gradient is a buffer view
        params = [p for s in self.slots for p in s.bucket.params]
        self._viewed = {id(p): (p, self._views[id(p)]) for p in params if id(p) in self._views}
        # per slot: what the hook multiplies each gradient by as it adds it in (1/divisor where no gradient
        # of the slot is a buffer view, so the whole bucket arrives through the hook), and the divisor
        # left for the launch (None: nothing left to divide)
        self._alpha: list[float] = []
        self._divisor: list[int | None] = []
        for slot in self.slots:
            divides = average and slot.divisor > 1
            hooked = not any(id(p) in self._views for p in slot.bucket.params)
            self._alpha.append(1 / slot.divisor if divides and hooked else 1.0)
            self._divisor.append(slot.divisor if divides and not hooked else None)
        # id(param) -> what its hook needs: slot index, .grad view (or None), span within the bucket
        self._hook_of: dict[int, tuple[int, torch.Tensor | None, int, int]] = {}
        for index, slot in enumerate(self.slots):
            for p in slot.bucket.params:
                start, end = slot.layout.span(p)
                offset = slot.bucket.start
                self._hook_of[id(p)] = (index, self._views.get(id(p)), start - offset, end - offset)
        self.syncing = True
        self._in_pass = False
        self._unreduced = False  # local gradients not reduced yet
        self._ready: set[int] = set()
        self._pending = [len(s.bucket.params) for s in self.slots]
        self._next = 0
        self._works: list[tuple[Any, int, Any]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    @property
    def in_progress(self) -> bool:
        """A synchronised backward ran and its reduction is not finished."""
        return bool(self._ready or self._works)

    @property
    def started(self) -> int:
        """How many buckets of the reduction under way have started."""
        return self._next

    def grad_view(self, param: torch.Tensor) -> torch.Tensor | None:
        """The buffer view that is ``param.grad`` (persistent local gradients of ``param``'s dtype)."""
        return self._views.get(id(param))

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally without communicating."""
        previous, self.syncing = self.syncing, False
        try:
            yield
        finally:
            self.syncing = previous

    def finish(self, *, always: bool = False) -> None:
        """Start the buckets not started yet and wait for all: what is local since the last reduction.
        ``always``: reduce even when no gradient arrived (a synchronisation point every rank reaches)."""
        if always or self._unreduced or self._works:
            self._claim_unready()
            while self._next < len(self.slots):
                self._launch_next()
            self._wait()

    def zero(self) -> None:
        """Zero the local gradients and the shards; ``.grad`` becomes the buffer view again."""
        if self._in_pass or self.in_progress:
            raise DataParallelError(
                "a gradient sync is in progress: call finish_grad_sync() before zeroing the gradients"
            )
        for layout in {id(s.layout): s.layout for s in self.slots if s.persistent}.values():
            layout.zero_()
        for slot in self.slots:
            slot.fresh = True
            if slot.shard is not None:
                slot.shard.zero_()
            if not slot.persistent:
                slot.local = None
        for p in (p for s in self.slots for p in s.bucket.params):
            view = self._views.get(id(p))
            if view is not None:
                p.grad = view
        self._unreduced = False

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if self.finish_in_backward and not self._in_pass:
            self._in_pass = True
            Variable._execution_engine.queue_callback(self._end_pass)
        key = id(param)
        index, view, start, end = self._hook_of[key]
        if view is not None:
            if param.grad is not view:  # .grad was reset (e.g. set to None): this gradient replaces it
                view.copy_(param.grad)
                param.grad = view
        else:
            local = self.slots[index].ensure_local()
            local[start:end].view(param.shape).add_(param.grad, alpha=self._alpha[index])
            param.grad = None
        self._unreduced = True
        if not self.syncing:
            return
        if key in self._ready:
            raise DataParallelError(
                "a parameter received a second gradient before the step's reduction finished: run every "
                "backward but the last of a step inside no_sync(), then finish_grad_sync()"
            )
        self._ready.add(key)
        self._pending[index] -= 1
        if self.overlap:
            while self._next < len(self.slots) and self._pending[self._next] == 0:
                self._launch_next()

    def _end_pass(self) -> None:
        self._in_pass = False
        if self.syncing and self.finish_in_backward:
            self.finish()

    def _claim_unready(self) -> None:
        """A parameter whose gradient did not arrive this step but whose ``.grad`` was reset counts as
        zero; one given a tensor by hand is copied in."""
        for p_id, (param, view) in self._viewed.items():
            if p_id in self._ready or param.grad is view:
                continue
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad)
            param.grad = view

    def _launch_next(self) -> None:
        index, self._next = self._next, self._next + 1
        slot = self.slots[index]
        slot.ensure_local()
        work, token = self.reduction.launch(slot, self._divisor[index])
        self._works.append((work, index, token))

    def _wait(self) -> None:
        for work, index, token in self._works:
            work.wait()
            slot = self.slots[index]
            self.reduction.complete(slot, token)
            if slot.shard is not None:
                slot.fresh = False
                if not slot.persistent:
                    slot.local = None  # ZeRO-2: only the shard stays
        self._works.clear()
        self._ready.clear()
        self._pending = [len(s.bucket.params) for s in self.slots]
        self._next = 0
        self._unreduced = False


def _prepare(data: torch.Tensor, dtype: torch.dtype | None, divisor: int | None) -> torch.Tensor:
    """What the collective moves: ``data`` in ``dtype`` divided by ``divisor``, the division folded into
    the cast where there is one (a pass of its own, in place, only where there is none)."""
    if dtype is None or dtype == data.dtype:
        return data if divisor is None else data.div_(divisor)
    if divisor is None:
        return data.to(dtype)
    return torch.div(data, divisor, out=torch.empty(data.shape, dtype=dtype, device=data.device))


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
