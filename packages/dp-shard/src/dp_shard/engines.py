"""The data-parallel engines behind :class:`~dp_shard.DataParallelEngine` (see :mod:`dp_shard.engine`):
:class:`DDPEngine`, :class:`ZeroEngine` (stages 1 and 2), :class:`FSDPEngine` (ZeRO-3 and HSDP), and
:func:`make_engine`, which builds the one a ``zero`` stage names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

import pstate
from pstate.tags import copy_tags

from .clip import clip_grad_norm_
from .data_parallel import DataParallel
from .engine import ClipGroups, DataParallelEngine, GroupsFn
from .engine_state import CheckpointPieces, fully_sharded_pieces, replicated_pieces, sharded_optimizer_pieces
from .errors import DataParallelError
from .fully_shard import fully_shard, sharded_state
from .sharded_optimizer import ShardedOptimizer


def _bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer counted once)."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


def _named(chunks: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    return {f"chunk{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters() if p.requires_grad}


def _plain(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**g, "params": [p for _, p in g["params"]]} for g in groups]


class DDPEngine(DataParallelEngine):
    """ZeRO-0: each chunk in :class:`~dp_shard.DataParallel` over ``group`` (experts over ``expert_group``),
    ``optimizer_cls`` on the full parameters. 16-bit parameters get fp32 main gradients (the bucket
    buffers) and fp32 master copies the optimizer steps, copied into the parameters after each step
    (Megatron's mixed precision); ``reduce_dtype`` is the dtype the all-reduce moves (default fp32)."""

    zero = 0

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        *,
        group: pstate.Group,
        expert_group: pstate.Group | None,
        param_groups: GroupsFn,
        optimizer_cls: type[torch.optim.Optimizer],
        reduce_dtype: torch.dtype | None = None,
        average: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        self.chunks = list(chunks)
        self.modules = [
            DataParallel(c, group=group, expert_group=expert_group, reduce_dtype=reduce_dtype, average=average)
            for c in self.chunks
        ]
        self.named = _named(self.chunks)
        self._params = list(self.named.values())
        self._masters: dict[int, torch.Tensor] = {}  # id(16-bit parameter) -> its fp32 master
        for p in self._params:
            if p.dtype.itemsize < 4:
                master = p.detach().float().clone()
                master.grad = p.main_grad  # the fp32 bucket view the reduction fills
                copy_tags(p, master)
                self._masters[id(p)] = master
        groups = [{**g, "params": [self.master(p) for p in g["params"]]} for g in _plain(param_groups(self.named))]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)

    def master(self, param: nn.Parameter) -> torch.Tensor:
        """What the optimizer steps for ``param``: its fp32 master copy, or the parameter itself."""
        return self._masters.get(id(param), param)

    def no_sync(self, chunk: int) -> AbstractContextManager[Any]:
        return self.modules[chunk].no_sync()

    def finish_grad_sync(self) -> None:
        for module in self.modules:
            module.finish_grad_sync()

    def zero_grad(self) -> None:
        for module in self.modules:
            module.zero_grad_buffer()

    def grad_of(self, param: nn.Parameter) -> torch.Tensor | None:
        return param.main_grad

    def main_grads(self) -> list[torch.Tensor | None]:
        return [p.main_grad for p in self._params]

    def clip_grad_norm_(self, max_norm: float, groups: ClipGroups) -> torch.Tensor:
        experts = dict(ep_group=groups.ep, etp_group=groups.etp) if groups.ep is not None else {}
        return clip_grad_norm_(self._params, max_norm, tp_group=groups.tp, pp_group=groups.pp, **experts)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self._masters:
            with torch.no_grad():
                for p in self._params:
                    if id(p) in self._masters:
                        p.copy_(self._masters[id(p)])

    def reload_model_params(self) -> None:
        """Copy the parameters into the masters again, after loading weights into the model."""
        with torch.no_grad():
            for p in self._params:
                if id(p) in self._masters:
                    self._masters[id(p)].copy_(p)

    def checkpoint_pieces(self) -> CheckpointPieces:
        finish = self._masters_to_params if self._masters else None  # after a load filled the masters
        return replicated_pieces(self.named, self.optimizer, master=self.master, finish=finish)

    def _masters_to_params(self) -> None:
        with torch.no_grad():
            for p in self._params:
                if id(p) in self._masters:
                    p.copy_(self._masters[id(p)])

    def memory_bytes(self) -> dict[str, int]:
        grads = _bytes(b.data for m in self.modules for b in m.grad_buffers)
        params = sum(p.numel() * p.element_size() for p in self._params)
        numel = sum(p.numel() for p in self._params)
        optimizer = _state_bytes(self.optimizer) + _bytes(self._masters.values())
        return {"params": params, "grads": grads, "optimizer": optimizer, "numel": numel}


class ZeroEngine(DataParallelEngine):
    """ZeRO-1/2: a :class:`~dp_shard.ShardedOptimizer` over ``group`` (experts over ``expert_group``) owns
    the reduction; the chunks run bare. ``aligned``: parameters laid out alone (tied copies)."""

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        *,
        stage: int,
        group: pstate.Group,
        expert_group: pstate.Group | None,
        param_groups: GroupsFn,
        optimizer_cls: type[torch.optim.Optimizer],
        aligned: Sequence[nn.Parameter] = (),
        reduce_dtype: torch.dtype | None = None,
        overlap_param_gather: bool = False,
        average: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        self.zero = stage
        self.chunks = list(chunks)
        self.modules = list(self.chunks)
        self.named = _named(self.chunks)
        self.optimizer = ShardedOptimizer(
            param_groups(self.named),
            optimizer_cls,
            group=group,
            stage=stage,
            aligned=aligned,
            expert_group=expert_group,
            finish_in_backward=False,  # finish_grad_sync reduces once, after every chunk's backward
            reduce_dtype=reduce_dtype,
            average=average,
            **optimizer_kwargs,
        )
        if overlap_param_gather:
            self.optimizer.overlap_param_gather(self.chunks)

    def wait_param_gather(self) -> None:
        self.optimizer.wait_param_gather()

    def reload_model_params(self) -> None:
        self.optimizer.reload_model_params()

    def no_sync(self, chunk: int) -> AbstractContextManager[Any]:
        return self.optimizer.no_sync()

    def finish_grad_sync(self) -> None:
        self.optimizer.finish_grad_sync()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def grad_of(self, param: nn.Parameter) -> torch.Tensor | None:
        return self.optimizer.grad_shard(param)

    def main_grads(self) -> list[torch.Tensor | None]:
        return self.optimizer.master_grads()

    def clip_grad_norm_(self, max_norm: float, groups: ClipGroups) -> torch.Tensor:
        experts = dict(ep_group=groups.ep, etp_group=groups.etp) if groups.ep is not None else {}
        return self.optimizer.clip_grad_norm_(max_norm, tp_group=groups.tp, pp_group=groups.pp, **experts)

    def checkpoint_pieces(self) -> CheckpointPieces:
        return sharded_optimizer_pieces(self.named, self.optimizer)

    def memory_bytes(self) -> dict[str, int]:
        held = self.optimizer.memory_bytes()
        params = list(self.named.values())
        numel = sum(p.numel() for p in params)
        optimizer = _state_bytes(self.optimizer.optimizer) + held["master"]  # per-element state and masters
        return {"params": _bytes(p.data for p in params), "grads": held["grad"], "optimizer": optimizer, "numel": numel}


class FSDPEngine(DataParallelEngine):
    """ZeRO-3: each chunk passed to :func:`~dp_shard.fully_shard` over ``group`` with ``units(chunk)``;
    ``optimizer_cls`` steps this rank's pieces. HSDP: ``group`` is the shard group and
    ``replicate_group`` the replicas across shard groups. Experts are sharded over ``expert_group``.
    ``param_dtype``/``reduce_dtype``: the gather (compute) and gradient-reduction dtypes; the shards keep
    the parameters' dtype (fp32 masters) and so does the optimizer state."""

    zero = 3

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        *,
        group: pstate.Group,
        units: Callable[[nn.Module], list[nn.Module]],
        param_groups: GroupsFn,
        optimizer_cls: type[torch.optim.Optimizer],
        replicate_group: pstate.Group | None = None,
        expert_group: pstate.Group | None = None,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = torch.float32,
        average: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        self.chunks = list(chunks)
        for chunk in self.chunks:  # the pieces keep the parameters' tags
            fully_shard(
                chunk, group=group, units=units(chunk), replicate_group=replicate_group, expert_group=expert_group,
                param_dtype=param_dtype, reduce_dtype=reduce_dtype, average=average,
            )  # fmt: skip
        self.modules = list(self.chunks)
        self.group, self.replicate_group, self.expert_group = group, replicate_group, expert_group
        self.named = _named(self.chunks)
        self.optimizer = optimizer_cls(_plain(param_groups(self.named)), **optimizer_kwargs)
        self._params = list(self.named.values())

    def no_sync(self, chunk: int) -> AbstractContextManager[Any]:
        return sharded_state(self.chunks[chunk]).no_sync()

    def finish_grad_sync(self) -> None:
        for chunk in self.chunks:  # what no_sync kept and the last passes did not reduce
            sharded_state(chunk).finish_grad_sync()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def grad_of(self, param: nn.Parameter) -> torch.Tensor | None:
        return param.grad

    def main_grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self._params]

    def clip_grad_norm_(self, max_norm: float, groups: ClipGroups) -> torch.Tensor:
        # each rank holds other elements over the shard group (experts: over theirs); replicas the same ones
        experts = dict(ep_group=groups.ep, etp_group=groups.etp) if groups.ep is not None else {}
        expert_groups = [self.expert_group] if self.expert_group is not None else []
        return clip_grad_norm_(
            self._params, max_norm, tp_group=groups.tp, pp_group=groups.pp, dense_groups=[self.group],
            expert_groups=expert_groups, **experts,
        )  # fmt: skip

    def checkpoint_pieces(self) -> CheckpointPieces:
        return fully_sharded_pieces(self.chunks, self.optimizer)

    def memory_bytes(self) -> dict[str, int]:
        units = [u for c in self.chunks for u in sharded_state(c).units]
        numel = sum(s.numel for u in units for s in u.slots)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self._params if p.grad is not None)
        params = sum(u.flat.numel() * u.flat.element_size() for u in units)
        return {"params": params, "grads": grads, "optimizer": _state_bytes(self.optimizer), "numel": numel}


def make_engine(
    zero: int,
    chunks: Sequence[nn.Module],
    *,
    group: pstate.Group,
    expert_group: pstate.Group | None = None,
    param_groups: GroupsFn,
    optimizer_cls: type[torch.optim.Optimizer],
    aligned: Sequence[nn.Parameter] = (),
    units: Callable[[nn.Module], list[nn.Module]] | None = None,
    replicate_group: pstate.Group | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    overlap_param_gather: bool = False,
    average: bool = True,
    **optimizer_kwargs: Any,
) -> DataParallelEngine:
    """The engine of ZeRO stage ``zero`` (0: DDP, 1/2: sharded optimizer, 3: fully sharded; with
    ``replicate_group`` HSDP: sharded over ``group``, replicated over ``replicate_group``).
    ``reduce_dtype``: the dtype gradient reductions move (every mode; fp32 is the main gradients');
    ``param_dtype``: ZeRO-3's gather dtype (see :class:`FSDPEngine`); ``overlap_param_gather`` (ZeRO-1/2):
    the step only starts the parameter gathers and the next forward waits for each bucket where it is
    first used. ``average=False``: every mode sums the gradients over the data-parallel ranks instead of
    averaging them, for a caller that weights each rank's loss by one over the data-parallel size (so a
    16-bit backward sees the gradients one process would, whatever the layout)."""
    if (replicate_group is not None or param_dtype is not None) and zero != 3:
        raise DataParallelError(f"replicate_group and param_dtype are ZeRO-3's (HSDP, gathers); zero={zero}")
    common = dict(
        group=group, param_groups=param_groups, optimizer_cls=optimizer_cls, average=average, **optimizer_kwargs
    )
    if zero == 0:
        return DDPEngine(chunks, expert_group=expert_group, reduce_dtype=reduce_dtype, **common)
    if zero in (1, 2):
        return ZeroEngine(
            chunks,
            stage=zero,
            expert_group=expert_group,
            aligned=aligned,
            reduce_dtype=reduce_dtype,
            overlap_param_gather=overlap_param_gather,
            **common,
        )
    if zero == 3:
        return FSDPEngine(
            chunks, units=units or (lambda chunk: []), replicate_group=replicate_group, expert_group=expert_group,
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, **common,
        )  # fmt: skip
    raise DataParallelError(f"zero={zero!r}: expected 0, 1, 2 or 3")
