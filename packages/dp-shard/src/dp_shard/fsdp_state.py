"""The hooks of a fully sharded module: when each unit is gathered, freed and reduced (see
:mod:`dp_shard.fully_shard` for the schedule), and where that state hangs on the module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import DataParallelError
from .fsdp_unit import FlatUnit, PendingReduce

STATE_ATTRIBUTE = "_dp_shard_fully_sharded"


def sharded_state(module: nn.Module) -> FullyShardedState:
    """The :class:`FullyShardedState` of a module passed to :func:`fully_shard`."""
    state = module.__dict__.get(STATE_ATTRIBUTE)
    if state is None:
        raise DataParallelError(f"this {type(module).__name__} was not passed to fully_shard()")
    return state


class UnitShards:
    """The flat shards one unit module holds (its dense parameters; its experts over their own group),
    gathered and freed together."""

    def __init__(self, module: nn.Module, flats: list[FlatUnit]) -> None:
        self.module, self.flats = module, flats

    def gather(self, *, async_op: bool) -> None:
        for flat in self.flats:
            flat.gather(async_op=async_op)

    def install_views(self) -> None:
        for flat in self.flats:
            flat.install_views()

    def free(self) -> None:
        for flat in self.flats:
            flat.free()


class FullyShardedState:
    """The units of one fully sharded module and the hooks that gather, free and reduce them. ``units``
    are the flat shards (:class:`FlatUnit`); ``modules`` the unit modules' :class:`UnitShards`."""

    def __init__(
        self,
        root: nn.Module,
        units: list[FlatUnit],
        group: dist.ProcessGroup,
        *,
        prefetch: bool,
        param_dtype: torch.dtype | None,
    ) -> None:
        self.root, self.units, self.group = root, units, group
        self.prefetch, self.param_dtype = prefetch, param_dtype
        by_module: dict[int, UnitShards] = {}
        for flat in units:
            by_module.setdefault(id(flat.module), UnitShards(flat.module, [])).flats.append(flat)
        self.modules = list(by_module.values())
        self._unit_of = by_module
        self._forward_order: list[UnitShards] = list(self.modules)  # predicted order of unit forwards
        self._current: list[UnitShards] = []  # pre-forward order in this forward
        self._finished: list[UnitShards] = []  # post-forward order in this forward
        self._backward_order: list[UnitShards] = []
        self._in_backward = False
        self._reduced: set[int] = set()  # the flat shards reduced (or stashed) in this backward
        self._pending: PendingReduce | None = None  # reduce-scatter in flight
        self._replicating: PendingReduce | None = None  # HSDP: the one before, its all-reduce in flight
        self._sync = True
        self._hooks = []
        hooked = [root] + [u.module for u in self.modules if u.module is not root]
        for mod in hooked:
            self._hooks.append(mod.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._hooks.append(mod.register_forward_hook(self._post_forward))
        for flat in units:
            self._hooks.append(flat.full.register_post_accumulate_grad_hook(self._make_post_backward(flat)))

    # forward -----------------------------------------------------------------------------------

    def _pre_forward(self, mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if mod is self.root:
            if self._in_backward:  # the last backward stopped early (it raised): settle what it left
                self._end_backward()
            self._current, self._finished = [], []
        unit = self._unit_of.get(id(mod))
        if unit is not None:
            unit.gather(async_op=False)
            unit.install_views()
            self._current.append(unit)
            if self.prefetch and len(self._current) < len(self._forward_order):
                self._forward_order[len(self._current)].gather(async_op=True)
        if self.param_dtype is None:
            return None
        return _cast(args, self.param_dtype), _cast(kwargs, self.param_dtype)

    def _post_forward(self, mod: nn.Module, args: tuple, output: Any) -> None:
        unit = self._unit_of.get(id(mod))
        if torch.is_grad_enabled():
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._make_pre_backward(unit))
        if unit is not None:
            unit.free()
            self._finished.append(unit)
        if mod is self.root:
            if self._current:
                self._forward_order = list(dict.fromkeys(self._current))
            for other in self.modules:  # prefetched but not used in this forward
                other.free()

    # backward ----------------------------------------------------------------------------------

    def _done(self, unit: UnitShards) -> bool:
        return all(id(flat) in self._reduced for flat in unit.flats)

    def _make_pre_backward(self, unit: UnitShards | None):
        def hook(grad: torch.Tensor) -> None:
            self._start_backward()
            if unit is None or self._done(unit):
                return
            unit.gather(async_op=False)
            if self.prefetch:
                order = self._backward_order
                position = order.index(unit) if unit in order else len(order)
                for following in order[position + 1 :]:
                    if following is not unit and not self._done(following):
                        following.gather(async_op=True)
                        break

        return hook

    def _start_backward(self) -> None:
        if self._in_backward:
            return
        self._in_backward = True
        self._backward_order = list(dict.fromkeys(reversed(self._finished)))
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside keep each unit's unsharded gradient instead of reducing it; the next
        synchronised pass (or :meth:`finish_grad_sync`) reduces the sum once."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish_grad_sync(self) -> None:
        """Reduce what ``no_sync`` kept and no synchronised pass reduced since (units unused in the last
        pass); a no-op otherwise. Every rank must have kept gradients of the same units."""
        for unit in self.units:
            if unit.unsharded_grad is not None:
                unit.start_reduce().finish()

    def _make_post_backward(self, flat: FlatUnit):
        def hook(full: torch.Tensor) -> None:
            self._start_backward()
            if not self._sync:
                flat.stash_grad()
                self._reduced.add(id(flat))
                return
            # a pipeline of reductions: the one before last finishes, the last moves on to its all-reduce
            # across replicas (HSDP), and this one's reduce-scatter starts
            if self._replicating is not None:
                self._replicating.finish()
            self._replicating = self._pending
            if self._pending is not None:
                self._pending.replicate()
            self._pending = flat.start_reduce()
            self._reduced.add(id(flat))

        return hook

    def _end_backward(self) -> None:
        for pending in (self._replicating, self._pending):
            if pending is not None:
                pending.finish()
        self._pending = self._replicating = None
        for unit in self.modules:
            unit.free()
        self._reduced.clear()
        self._in_backward = False


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
