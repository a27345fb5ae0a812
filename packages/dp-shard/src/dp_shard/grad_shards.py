"""The gradient side of ZeRO-1/2: gradients reduce-scattered bucket by bucket into this rank's shard.

Layout. The parameters are grouped by dtype; each group is laid out in reverse order (about the order
backward produces gradients) as a :class:`~dp_shard.buffers.GradBuffer` with ``align`` = the group
size, so every bucket splits into equal shards and rank ``r`` owns the ``r``-th shard of every bucket.
Parameters are moved into a contiguous buffer of the same layout (``param.data`` becomes a view of
it), so the all-gather after the optimizer step writes straight into the model. Gradients are kept and
reduced in the master dtype: float32 for 16-bit parameters, else the parameter's own.

Where gradients live (Megatron's layout, bytes per parameter in :mod:`dp_shard.memory`):

- stage 1: a full local buffer in the master dtype. A same-dtype parameter's ``.grad`` is its view, so
  autograd accumulates in place; a 16-bit gradient is added into the float32 view by a hook and freed.
  The reduced shard is this rank's piece of each bucket of that same buffer (no second copy); the
  master weights' ``.grad`` are views of it;
- stage 2: a *shard buffer* (1/N of the gradients) holds the reduced shards; a bucket gets a staging
  buffer when its first gradient arrives, the hook adds each gradient into it and frees ``.grad``, and
  the staging buffer is freed once the bucket is reduced.

When. The shared :class:`~dp_shard.bucket_sched.BucketScheduler` with the reduce-scatter strategy: a
bucket's reduction starts once all of its parameters have their gradient and every earlier bucket has
started. With ``finish_in_backward`` (the default) the reduction is finished when the backward pass
ends, so after ``loss.backward()`` returns the shards hold the gradients. Without it, :meth:`finish`
does that, once per step: what a pipeline needs, whose model chunks end their passes at different times.

Inside :meth:`no_sync` backward passes only accumulate locally (stage 2: into bucket staging buffers
that stay until the next reduction), so each gradient element is reduced once per step whatever the
number of micro-batches. Stage 2 then holds the full local gradient during a step of several
micro-batches, as FSDP2 does without gradient sync; between steps it holds only its shard. Stage 1 with
reduce-scatter refuses a second reduction in one step without ``zero_grad()`` (its shard shares the
bucket with the next step's local gradients).

Collectives. A reduce-scatter per bucket and an all-gather of the updated parameters, except over gloo,
whose CPU reduce-scatter is slower than its all-reduce of the whole bucket (about 41 against 35 ms for
8 MB at DP=2) and whose all-gather is slower than one broadcast per owner: there each bucket is
all-reduced and the own shard taken from it, and the parameters are broadcast shard by shard
(``collectives="all_reduce"``; ``"reduce_scatter"`` forces the other way, ``"auto"`` picks). The
bucket is the full local buffer (stage 1) or the bucket-sized staging buffer (stage 2) either way, so
this costs no memory. The parameter gathers can be started asynchronously (:meth:`ShardedGrads.start_param_gather`)
and waited bucket by bucket, which lets the next forward overlap them.

Averaging divides each bucket by the group size before it is reduced, or by ``divisor``: expert
parameters, reduced over the expert-data-parallel group, are divided by the dense data-parallel size
(as in ``DataParallel``), since every dense replica's tokens reach the experts.

Parameters passed as ``alone`` get a bucket each, so the elements a rank owns of them depend only on
their size and the group's: ranks of two pipeline stages holding copies of one tensor own matching
pieces, whose reduced gradients can be summed between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pstate import comm

from .bucket_sched import BucketScheduler, ReduceScatter, Slot
from .buffers import GradBuffer


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of master weights and reduced gradients for parameters of ``dtype``."""
    return dtype if dtype.itemsize >= 4 else torch.float32


@dataclass
class Owned:
    """The piece of one parameter this rank owns: elements ``[start, stop)`` of its flattening."""

    start: int
    stop: int
    param: torch.Tensor  # those elements of the parameter (a view)
    grad: torch.Tensor  # those elements of the reduced gradient (a view of the shard)


class ShardedGrads:
    """Gradient storage, layout and collectives of :class:`~dp_shard.ShardedOptimizer` (see the module);
    the hooks and launch order are the shared :class:`~dp_shard.bucket_sched.BucketScheduler`'s."""

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
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.group, self.stage = group, stage
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        divisor = self.size if divisor is None else divisor  # what averaging divides by
        if collectives not in ("auto", "reduce_scatter", "all_reduce"):
            raise ValueError(f"collectives={collectives!r}: expected 'auto', 'reduce_scatter' or 'all_reduce'")
        gloo = collectives == "auto" and dist.get_backend(group) == "gloo"
        self._gloo = gloo or collectives == "all_reduce"  # all-reduce buckets, broadcast parameters
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in reversed(params):
            by_dtype.setdefault(p.dtype, []).append(p)
        self.shard_buffers: list[torch.Tensor] = []  # stage 2: the reduced shards (stage 1: in the buckets)
        self.local_buffers: list[torch.Tensor] = []  # stage 1: the full local gradients
        alone_ids = {id(p) for p in alone}
        slots = []
        for dtype, members in by_dtype.items():
            slots += self._lay_out(dtype, members, int(bucket_size_mb * 2**20), alone_ids, divisor)
        self.sched = BucketScheduler(
            slots,
            ReduceScatter(use_all_reduce=self._gloo, reduce_dtype=reduce_dtype),
            overlap=overlap,
            average=average,
            finish_in_backward=finish_in_backward,
        )
        self.slots = self.sched.slots
        self._slot_of = {id(p): i for i, s in enumerate(self.slots) for p in s.bucket.params}
        self._gathers: dict[int, list[Any]] = {}  # slot index -> its parameter gather in flight

    def _lay_out(
        self, dtype: torch.dtype, members: list[torch.nn.Parameter], bucket_bytes: int, alone: set[int], divisor: int
    ) -> list[Slot]:
        grad_dtype = master_dtype(dtype)
        device = members[0].device
        layout = GradBuffer(
            members,
            dtype=grad_dtype,
            bucket_numel=max(1, bucket_bytes // grad_dtype.itemsize),
            align=self.size,
            device=device if self.stage == 1 else torch.device("meta"),
            alone=alone,
        )
        param_buffer = torch.zeros(layout.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for p in members:
                start, end = layout.span(p)
                param_buffer[start:end].copy_(p.detach().reshape(-1))
                p.data = param_buffer[start:end].view_as(p)
        if self.stage == 1:
            self.local_buffers.append(layout.data)
        else:
            self.shard_buffers.append(torch.zeros(layout.numel // self.size, dtype=grad_dtype, device=device))
        slots = []
        for bucket in layout.buckets:
            if self.stage == 1:  # the reduced shard is the own piece of the local bucket (Megatron's layout)
                local, shard = bucket.data, bucket.shard(self.rank, self.size)
            else:
                local, shard = None, self.shard_buffers[-1][bucket.start // self.size :][: bucket.numel // self.size]
            params = param_buffer[bucket.start : bucket.end]
            persistent = self.stage == 1
            slots.append(Slot(bucket, layout, self.group, divisor, local, shard, params, persistent=persistent))
        return slots

    def owned(self, param: torch.nn.Parameter) -> Owned | None:
        """This rank's piece of ``param``, or ``None`` when it owns none of it."""
        slot = self.slots[self._slot_of[id(param)]]
        start, end = slot.layout.span(param)
        piece = slot.bucket.numel // self.size
        low = slot.bucket.start + self.rank * piece
        first, last = max(start, low), min(end, low + piece)
        if first >= last:
            return None
        flat = slot.params[first - slot.bucket.start : last - slot.bucket.start]
        return Owned(first - start, last - start, flat, slot.shard[first - low : last - low])

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside accumulate locally without communicating (see the module notes)."""
        return self.sched.no_sync()

    def finish(self) -> None:
        """Start the buckets not started yet, wait for all and add them into the shards: what is still local
        since the last reduction (accumulated under ``no_sync``, or left by a pass that did not finish)."""
        self.sched.finish()

    def zero_grad(self) -> None:
        """Zero the reduced shards and any local accumulation."""
        self.sched.zero()

    def start_param_gather(self, order: Iterable[int] | None = None) -> None:
        """Start gathering every bucket's parameters from their owners (async, in ``order`` of slot indices:
        default bucket order), into ``param.data`` in place; :meth:`wait_param_gather` waits."""
        for index in range(len(self.slots)) if order is None else order:
            slot = self.slots[index]
            piece = slot.bucket.numel // self.size
            if self._gloo:  # one broadcast per owner (gloo's all-gather is slower)
                works = []
                for owner in range(self.size):
                    source = dist.get_global_rank(self.group, owner)
                    data = slot.params[owner * piece : (owner + 1) * piece]
                    works.append(comm.broadcast(data, source, group=self.group, async_op=True))
            else:
                own = slot.params[self.rank * piece : (self.rank + 1) * piece]
                works = [comm.all_gather(slot.params, own, group=self.group, async_op=True)]
            self._gathers[index] = works

    def wait_param_gather(self, indices: Iterable[int] | None = None) -> None:
        """Wait for the gathers of the slots ``indices`` (default: all) still in flight."""
        for index in list(self._gathers) if indices is None else indices:
            for work in self._gathers.pop(index, ()):
                work.wait()

    def pending_gathers(self) -> int:
        """How many buckets' parameter gathers are in flight."""
        return len(self._gathers)

    def slot_index(self, param: torch.nn.Parameter) -> int:
        """The index of the bucket that holds ``param``."""
        return self._slot_of[id(param)]

    def all_gather_params(self) -> None:
        """Give every rank the parameter shards the others updated (into ``param.data``, in place)."""
        self.start_param_gather()
        self.wait_param_gather()

    def resident_bytes(self) -> int:
        """Bytes of gradient storage held now: shard buffers, local buffers and ``.grad`` of the parameters."""
        tensors = [*self.shard_buffers, *self.local_buffers]
        for slot in self.slots:
            tensors += [slot.local] + [p.grad for p in slot.bucket.params]
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values())
