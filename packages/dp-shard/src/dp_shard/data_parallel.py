"""``DataParallel``: gradients in contiguous bucketed buffers, all-reduced bucket by bucket during backward.

Where the gradients live. Every trainable parameter gets ``param.main_grad``, a view into a flat
:class:`~dp_shard.buffers.GradBuffer` of ``grad_dtype``. When ``grad_dtype`` equals the parameter's
dtype, ``param.grad`` *is* that same view, so autograd accumulates straight into the buffer and any
``torch.optim`` optimizer works unchanged. When they differ (bf16 parameters, fp32 gradients), a hook
adds each new ``param.grad`` into the fp32 ``main_grad`` and frees ``param.grad``; the optimizer reads
``main_grad`` (Megatron's convention).

When they are reduced. Buffers are laid out in reverse registration order (about the order backward
produces gradients) and cut into buckets of about ``bucket_size_mb``; the
:class:`~dp_shard.bucket_sched.BucketScheduler` (shared with ZeRO-1/2, here with the all-reduce
strategy) starts each bucket's async all-reduce during backward once it is full and every earlier bucket
has started. :meth:`finish_grad_sync` starts the rest (a parameter unused in this step takes part with
its zeros or accumulated gradient, so the collectives match across ranks) and waits for all. The caller
calls it after the last backward of a step and before ``optimizer.step()``, as in Megatron: that lets a
pipeline schedule choose when to wait. A forward with grad enabled after a backward whose sync was not
finished raises :class:`DataParallelError` instead of training on unsynchronised gradients.

Averaging (``average=True``) divides each bucket by the group size just before its all-reduce
(pre-division, as torch DDP does). ``reduce_dtype`` (default: the buffer's) is the dtype the all-reduce
moves, e.g. bf16 for fp32 main gradients.

Expert parameters (tagged ``expert_parallel`` by ``moe-dispatch``) live in buffers of their own and are
reduced over ``expert_group`` (``ps.edp``: the ranks that hold the same experts), but divided by the
size of ``group`` (the dense data-parallel size), because every dense replica's tokens reach the
experts: dividing by the expert group's size instead would scale expert gradients up by ``dp / edp``.
Tagged parameters without an ``expert_group`` are refused, since reducing them over ``group`` would sum
different experts.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pstate
from pstate.tags import is_expert_parallel

from .bucket_sched import AllReduce, BucketScheduler, Slot
from .buffers import Bucket, GradBuffer
from .checks import check_same_parameters
from .errors import DataParallelError


class DataParallel(nn.Module):
    """Data parallel wrapper of ``module`` over ``group`` (a ``pstate`` axis or a process group).

    Shared (tied) parameters are managed once. ``grad_dtype=None`` keeps each parameter's own dtype.
    ``expert_group`` (``ps.edp``) reduces the parameters tagged ``expert_parallel``; see the module notes.
    Use :meth:`no_sync` for all but the last micro-batch of a step, call :meth:`finish_grad_sync`
    before the optimizer step and :meth:`zero_grad_buffer` (or ``zero_grad()``) after it.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        group: pstate.Group,
        bucket_size_mb: float = 25.0,
        overlap: bool = True,
        grad_dtype: torch.dtype | None = torch.float32,
        average: bool = True,
        expert_group: pstate.Group | None = None,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise DataParallelError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not bucket_size_mb > 0:
            raise DataParallelError(f"bucket_size_mb={bucket_size_mb} must be > 0")
        if grad_dtype is not None and not grad_dtype.is_floating_point:
            raise DataParallelError(f"grad_dtype={grad_dtype} must be a floating-point dtype")
        self.module = module
        self.process_group = pstate.as_group(group)
        self.group_size = dist.get_world_size(self.process_group)
        self.overlap, self.average = overlap, average
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # tied parameters once
        if not named:
            raise DataParallelError(f"{type(module).__name__} has no trainable parameters to synchronise")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise DataParallelError(f"parameters are on several devices {sorted(map(str, devices))}; expected one")
        check_same_parameters(named, self.process_group)
        experts = [n for n, p in named if is_expert_parallel(p)]
        if experts and expert_group is None:
            raise DataParallelError(
                f"{len(experts)} expert parameters (e.g. {experts[0]!r}) need expert_group= (the expert-data-"
                "parallel group, ps.edp): reducing them over the dense group would sum different experts"
            )
        self.expert_group = None if expert_group is None else pstate.as_group(expert_group)

        backward_order = [p for _, p in reversed(named)]
        by_kind: dict[tuple[bool, torch.dtype], list[nn.Parameter]] = {}
        for p in backward_order:
            by_kind.setdefault((is_expert_parallel(p), grad_dtype or p.dtype), []).append(p)
        bytes_per_bucket = int(bucket_size_mb * 2**20)
        self.grad_buffers = [
            GradBuffer(params, dtype=dtype, bucket_numel=max(1, bytes_per_bucket // dtype.itemsize))
            for (_, dtype), params in by_kind.items()
        ]
        slots = []
        for (expert, _), buffer in zip(by_kind, self.grad_buffers):
            group = self.expert_group if expert else self.process_group
            slots += [Slot(b, buffer, group, self.group_size, b.data) for b in buffer.buckets]
        for buffer in self.grad_buffers:
            for p in buffer.params:
                p.main_grad = buffer.view(p)
        self._sched = BucketScheduler(slots, AllReduce(reduce_dtype), overlap=overlap, average=average)
        self._buckets: list[Bucket] = [s.bucket for s in slots]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._sched.in_progress and torch.is_grad_enabled():
            raise DataParallelError(
                "a backward pass ran since the last finish_grad_sync(): call finish_grad_sync() after the "
                "last backward of a step (before optimizer.step()), and wrap the other micro-batches in no_sync()"
            )
        return self.module(*args, **kwargs)

    @property
    def buckets_started(self) -> int:
        """How many buckets' all-reduces the reduction under way has started (0 between steps)."""
        return self._sched.started

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside accumulate into the buffers without communicating; the first
        synchronised backward after it reduces everything accumulated."""
        return self._sched.no_sync()

    def finish_grad_sync(self) -> None:
        """Start every bucket not started yet (in bucket order) and wait for all reductions; afterwards
        each ``main_grad`` (and ``.grad`` where it is the view) holds the group's reduced gradient.
        Call it once per step on every rank (a second call would reduce again); a no-op inside
        :meth:`no_sync`."""
        if self._sched.syncing:
            self._sched.finish(always=True)

    def zero_grad_buffer(self) -> None:
        """Zero every gradient buffer; ``.grad`` of same-dtype parameters becomes the (zero) view again."""
        self._sched.zero()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Same as :meth:`zero_grad_buffer`: gradients stay buffer views, so ``set_to_none`` is ignored."""
        self.zero_grad_buffer()
