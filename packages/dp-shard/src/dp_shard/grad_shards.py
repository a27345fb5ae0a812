"""The gradient side of ZeRO-1/2: gradients reduce-scattered bucket by bucket into this rank's shard.

Layout. The parameters are grouped by dtype; each group is laid out in reverse order (about the order
backward produces gradients) as a :class:`~dp_shard.buffers.GradBuffer` with ``align`` = the group
size, so every bucket splits into equal shards and rank ``r`` owns the ``r``-th shard of every bucket.
Parameters are moved into a contiguous buffer of the same layout (``param.data`` becomes a view of
it), so the all-gather after the optimizer step writes straight into the model. Gradients are kept and
reduced in the master dtype: float32 for 16-bit parameters, else the parameter's own.

Where gradients live. Every rank keeps a *shard buffer* (1/N of the gradients) holding its reduced
gradient shards; the master weights' ``.grad`` are views of it. Local, unreduced gradients live in

- stage 1: a full local buffer. A same-dtype parameter's ``.grad`` is its view, so autograd
  accumulates in place; a 16-bit gradient is added into the float32 view by a hook and freed;
- stage 2: nowhere for long: a bucket gets a staging buffer when its first gradient arrives, the hook
  adds each gradient into it and frees ``.grad``, and the staging buffer is freed once the bucket is
  reduced. Only the shard buffer stays.

When. As in ``DataParallel``: a bucket's reduce-scatter starts once all of its parameters have their
gradient and every earlier bucket has started (one collective order on every rank). With
``finish_in_backward`` (the default) the first hook of a backward pass queues an autograd-engine
callback that runs when the pass ends: it starts the buckets still waiting (their unused parameters
contribute zeros), waits for all and adds each reduced piece into the shard buffer. So after
``loss.backward()`` returns, the shards hold the gradients. Without it, :meth:`finish` does that, once
per step: what a pipeline needs, whose model chunks end their backward passes at different times.

Inside :meth:`no_sync` backward passes only accumulate locally (stage 2: into bucket staging buffers
that stay until the next reduction), so each gradient element is reduced once per step whatever the
number of micro-batches. Stage 2 then holds the full local gradient during a step of several
micro-batches, as FSDP2 does without gradient sync; between steps it holds only its shard.

Collectives. A reduce-scatter per bucket and an all-gather of the updated parameters, except over gloo,
whose CPU reduce-scatter is slower than its all-reduce of the whole bucket (about 41 against 35 ms for
8 MB at DP=2) and whose all-gather is slower than one broadcast per owner: there each bucket is
all-reduced and the own shard taken from it, and the parameters are broadcast shard by shard
(``collectives="all_reduce"``; ``"reduce_scatter"`` forces the other way, ``"auto"`` picks). The
bucket is the full local buffer (stage 1) or the bucket-sized staging buffer (stage 2) either way, so
this costs no memory.

Averaging divides each bucket by the group size before it is reduced, or by ``divisor``: expert
parameters, reduced over the expert-data-parallel group, are divided by the dense data-parallel size
(as in ``DataParallel``), since every dense replica's tokens reach the experts.

Parameters passed as ``alone`` get a bucket each, so the elements a rank owns of them depend only on
their size and the group's: ranks of two pipeline stages holding copies of one tensor own matching
pieces, whose reduced gradients can be summed between them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import Variable

from pstate import comm

from .buffers import Bucket, GradBuffer
from .errors import DataParallelError


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of master weights and reduced gradients for parameters of ``dtype``."""
    return dtype if dtype.itemsize >= 4 else torch.float32


@dataclass
class Owned:
    """The piece of one parameter this rank owns: elements ``[start, stop)`` of its flattening."""

    start: int
    stop: int
    param: torch.Tensor  # those elements of the parameter (a view)
    grad: torch.Tensor  # those elements of the reduced gradient (a view of the shard buffer)


@dataclass
class _Slot:
    """One bucket with the tensors around it."""

    bucket: Bucket
    params: torch.Tensor  # the bucket's slice of the parameter buffer
    shard: torch.Tensor  # this rank's reduced gradient shard of the bucket
    local: torch.Tensor | None  # unreduced local gradients (stage 1: persistent; stage 2: staging)
    grad_dtype: torch.dtype


class ShardedGrads:
    """Gradient storage, hooks and collectives of :class:`~dp_shard.ShardedOptimizer` (see the module)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        group: dist.ProcessGroup,
        stage: int,
        bucket_size_mb: float,
        overlap: bool,
        average: bool,
        collectives: str = "auto",
        alone: Sequence[torch.nn.Parameter] = (),
        divisor: int | None = None,
        finish_in_backward: bool = True,
    ) -> None:
        self.group, self.stage, self.overlap, self.average = group, stage, overlap, average
        self.finish_in_backward = finish_in_backward
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.divisor = self.size if divisor is None else divisor  # what averaging divides by
        if collectives not in ("auto", "reduce_scatter", "all_reduce"):
            raise ValueError(f"collectives={collectives!r}: expected 'auto', 'reduce_scatter' or 'all_reduce'")
        gloo = collectives == "auto" and dist.get_backend(group) == "gloo"
        self._gloo = gloo or collectives == "all_reduce"  # all-reduce buckets, broadcast parameters
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in reversed(params):
            by_dtype.setdefault(p.dtype, []).append(p)
        self.slots: list[_Slot] = []
        self._where: dict[int, tuple[int, GradBuffer]] = {}  # id(param) -> (slot index, its layout)
        self._grad_views: dict[int, torch.Tensor] = {}  # stage 1, same dtype: id(param) -> its .grad view
        self.shard_buffers: list[torch.Tensor] = []
        self.local_buffers: list[torch.Tensor] = []
        self._alone = {id(p) for p in alone}
        for dtype, members in by_dtype.items():
            self._lay_out(dtype, members, int(bucket_size_mb * 2**20))
        self._fresh = [True] * len(self.slots)  # the shard holds zeros: reduce straight into it
        self._syncing = True
        self._in_pass = False
        self._unreduced = False  # local gradients not reduced yet (accumulated, or buckets still waiting)
        self._pending = [len(s.bucket.params) for s in self.slots]
        self._ready: set[int] = set()  # ids of parameters counted in this reduction
        self._next = 0
        self._works: list[tuple[Any, int, torch.Tensor]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    def _lay_out(self, dtype: torch.dtype, members: list[torch.nn.Parameter], bucket_bytes: int) -> None:
        grad_dtype = master_dtype(dtype)
        device = members[0].device
        layout = GradBuffer(
            members,
            dtype=grad_dtype,
            bucket_numel=max(1, bucket_bytes // grad_dtype.itemsize),
            align=self.size,
            device=device if self.stage == 1 else torch.device("meta"),
            alone=self._alone,
        )
        param_buffer = torch.zeros(layout.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for p in members:
                start, end = layout.span(p)
                param_buffer[start:end].copy_(p.detach().reshape(-1))
                p.data = param_buffer[start:end].view_as(p)
        shard_buffer = torch.zeros(layout.numel // self.size, dtype=grad_dtype, device=device)
        self.shard_buffers.append(shard_buffer)
        if self.stage == 1:
            self.local_buffers.append(layout.data)
        for bucket in layout.buckets:
            piece = bucket.numel // self.size
            shard = shard_buffer[bucket.start // self.size :][:piece]
            local = bucket.data if self.stage == 1 else None
            slot = _Slot(bucket, param_buffer[bucket.start : bucket.end], shard, local, grad_dtype)
            for p in bucket.params:
                self._where[id(p)] = (len(self.slots), layout)
                if self.stage == 1 and p.dtype == grad_dtype:
                    p.grad = self._grad_views[id(p)] = layout.view(p)
            self.slots.append(slot)

    def owned(self, param: torch.nn.Parameter) -> Owned | None:
        """This rank's piece of ``param``, or ``None`` when it owns none of it."""
        index, layout = self._where[id(param)]
        slot = self.slots[index]
        start, end = layout.span(param)
        piece = slot.bucket.numel // self.size
        low = slot.bucket.start + self.rank * piece
        first, last = max(start, low), min(end, low + piece)
        if first >= last:
            return None
        flat = slot.params[first - slot.bucket.start : last - slot.bucket.start]
        return Owned(first - start, last - start, flat, slot.shard[first - low : last - low])

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally without communicating (see the module notes)."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def finish(self) -> None:
        """Start the buckets not started yet, wait for all and add them into the shards: what is still local
        since the last reduction (accumulated under ``no_sync``, or left by a pass that did not finish)."""
        if self._unreduced or self._works:
            self._launch_rest()
            self._wait()

    def zero_grad(self) -> None:
        """Zero the reduced shards and any local accumulation."""
        if self._in_pass:
            raise RuntimeError("zero_grad() during a backward pass")
        for buffer in self.shard_buffers:
            buffer.zero_()
        if self._unreduced:  # otherwise the local buffer was zeroed when it was reduced
            for buffer in self.local_buffers:
                buffer.zero_()
        for index, slot in enumerate(self.slots):
            self._fresh[index] = True
            if self.stage == 2:
                slot.local = None
            for p in slot.bucket.params:
                if id(p) in self._grad_views:
                    p.grad = self._grad_views[id(p)]
        self._unreduced = False

    def all_gather_params(self) -> None:
        """Give every rank the parameter shards the others updated (into ``param.data``, in place)."""
        works = []
        for slot in self.slots:
            piece = slot.bucket.numel // self.size
            if self._gloo:
                for owner in range(self.size):
                    source = dist.get_global_rank(self.group, owner)
                    data = slot.params[owner * piece : (owner + 1) * piece]
                    works.append(comm.broadcast(data, source, group=self.group, async_op=True))
                continue
            own = slot.params[self.rank * piece : (self.rank + 1) * piece]
            works.append(comm.all_gather(slot.params, own, group=self.group, async_op=True))
        for work in works:
            work.wait()

    def resident_bytes(self) -> int:
        """Bytes of gradient storage held now: shard buffers, local buffers and ``.grad`` of the parameters."""
        storages = {b.untyped_storage()._cdata: b.untyped_storage().nbytes() for b in self.shard_buffers}
        for slot in self.slots:
            tensors = [slot.local] + [p.grad for p in slot.bucket.params]
            for t in tensors:
                if t is not None:
                    storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._in_pass:
            self._in_pass = True
            Variable._execution_engine.queue_callback(self._end_pass)
        index, layout = self._where[id(param)]
        slot = self.slots[index]
        if slot.local is None:
            slot.local = torch.zeros(slot.bucket.numel, dtype=slot.grad_dtype, device=slot.shard.device)
        view = self._grad_views.get(id(param))
        if view is not None:
            if param.grad is not view:  # .grad was reset by hand: this gradient replaces it
                view.copy_(param.grad)
                param.grad = view
        else:
            start, end = layout.span(param)
            slot.local[start - slot.bucket.start : end - slot.bucket.start].view_as(param).add_(param.grad)
            param.grad = None
        self._unreduced = True
        if not self._syncing:
            return
        if id(param) in self._ready:
            raise DataParallelError(
                "a parameter received a second gradient before the reduction finished: run every backward "
                "but the last of a step inside no_sync(), then finish_grad_sync()"
            )
        self._ready.add(id(param))
        self._pending[index] -= 1
        if self.overlap:
            while self._next < len(self.slots) and self._pending[self._next] == 0:
                self._launch_next()

    def _end_pass(self) -> None:
        self._in_pass = False
        if self._syncing and self.finish_in_backward:
            self._launch_rest()
            self._wait()

    def _launch_rest(self) -> None:
        while self._next < len(self.slots):
            self._launch_next()

    def _launch_next(self) -> None:
        index, self._next = self._next, self._next + 1
        slot = self.slots[index]
        if slot.local is None:  # stage 2, no gradient arrived in this bucket on this rank
            slot.local = torch.zeros(slot.bucket.numel, dtype=slot.grad_dtype, device=slot.shard.device)
        if self.average and self.divisor > 1:
            slot.local.div_(self.divisor)
        if self._gloo:
            piece = slot.bucket.numel // self.size
            out = slot.local[self.rank * piece : (self.rank + 1) * piece]
            work = comm.all_reduce(slot.local, group=self.group, async_op=True)
        else:
            out = slot.shard if self._fresh[index] else torch.empty_like(slot.shard)
            work = comm.reduce_scatter(out, slot.local, group=self.group, async_op=True)
        self._works.append((work, index, out))

    def _wait(self) -> None:
        for work, index, out in self._works:
            work.wait()
            slot = self.slots[index]
            if out is not slot.shard and self._fresh[index]:
                slot.shard.copy_(out)
            elif out is not slot.shard:
                slot.shard.add_(out)
            self._fresh[index] = False
            if self.stage == 1:
                slot.local.zero_()
            else:
                slot.local = None
        self._works.clear()
        self._ready.clear()
        self._pending = [len(s.bucket.params) for s in self.slots]
        self._next = 0
        self._unreduced = False
