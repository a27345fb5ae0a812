"""Waiting for ZeRO-1/2's overlapped parameter gathers before a forward reads a parameter.

After :meth:`~dp_shard.ShardedOptimizer.step` with overlapped gathers, every bucket's gather is in flight
and a parameter holds stale or half-written values until its bucket is waited. A forward reads a
parameter in one of two ways, and each waits for the parameter's bucket the first time:

- inside the forward of a module that registers it (its own, or a tied alias registered there too, as
  ``named_parameters(remove_duplicate=False)`` lists them): a forward pre-hook on the module waits for
  the buckets of all of its direct parameters when the module is entered;
- anywhere else, through the attribute of a module that registers it (a tied head reading
  ``embedding.weight`` on a stage where the embedding's forward never runs, a module reading another's
  weight before that one runs, a multi-token-prediction module reading the main head): each such
  module's class is swapped for a subclass of the same name whose ``__getattr__`` waits for the
  parameter's bucket before returning it (``nn.Module`` keeps parameters out of ``__dict__``, so every
  ``module.weight`` goes through ``__getattr__``). PyTorch's parametrizations and FSDP2 swap classes
  the same way.

A reference taken before the step (a tensor kept aside, ``parameters()`` iterated outside the owner's
forward) is not seen: such code calls :meth:`~dp_shard.ShardedOptimizer.wait_param_gather` first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

Slot = tuple[int, int]  # (part number, bucket index in that part)


class GatherWaits:
    """The buckets still gathering and the hooks that wait for them (see the module notes).

    ``parts``: objects with ``wait_param_gather(indices)`` (the optimizer's ``ShardedGrads``);
    ``slot_of``: a parameter's ``(part, bucket)``, ``None`` for a parameter this optimizer does not hold."""

    def __init__(self, parts: Sequence[Any], slot_of: Callable[[torch.nn.Parameter], Slot | None]) -> None:
        self.parts, self._slot_of = parts, slot_of
        self.slots: dict[int, Slot] = {}  # id(param) -> its bucket, for every parameter a watched module holds
        self.pending: set[Slot] = set()
        self._classes: dict[type, type] = {}  # a watched module's class -> the subclass that waits on reads
        self._hooks: list[Any] = []

    def watch(self, modules: Iterable[torch.nn.Module]) -> list[Slot]:
        """Hook and watch every submodule of ``modules`` that registers one of the parameters; return the
        buckets in the order the submodules register them (about the order a forward uses them)."""
        order: dict[Slot, None] = {}
        for module in modules:
            for sub in module.modules():
                own: dict[Slot, None] = {}
                for _, p in sub.named_parameters(recurse=False, remove_duplicate=False):
                    slot = self._slot_of(p)
                    if slot is not None:
                        own[slot] = None
                        self.slots[id(p)] = slot
                if own:
                    order.update(own)
                    self._hooks.append(sub.register_forward_pre_hook(_EnterWait(self, list(own))))
                    sub.__class__ = self._watched(type(sub))
        return list(order)

    @property
    def active(self) -> bool:
        """Whether :meth:`watch` found modules to hook (the gathers are then deferred to the forward)."""
        return bool(self._hooks)

    def started(self, slots: Iterable[Slot]) -> None:
        """The gathers of ``slots`` are in flight."""
        self.pending.update(slots)

    def wait(self, slots: Iterable[Slot]) -> None:
        """Wait for those of ``slots`` still in flight."""
        for slot in slots:
            if slot in self.pending:
                self.pending.discard(slot)
                self.parts[slot[0]].wait_param_gather((slot[1],))

    def waited_all(self) -> None:
        """Every gather was waited (by the optimizer, for all buckets at once)."""
        self.pending.clear()

    def before_read(self, value: Any) -> None:
        """``value`` was just read from a watched module: wait for its bucket if it is a parameter in flight."""
        if self.pending:
            slot = self.slots.get(id(value))
            if slot is not None and slot in self.pending:
                self.wait((slot,))

    def is_pending(self, param: torch.nn.Parameter) -> bool:
        """Whether ``param``'s bucket is still gathering."""
        return self.slots.get(id(param)) in self.pending

    def _watched(self, cls: type) -> type:
        if cls not in self._classes:
            self._classes[cls] = _watching_class(cls, self)
        return self._classes[cls]


def _watching_class(cls: type, waits: GatherWaits) -> type:
    """A subclass of ``cls`` (same name) whose attribute reads of parameters wait for their gathers."""

    def __getattr__(self: torch.nn.Module, name: str) -> Any:
        value = cls.__getattr__(self, name)
        waits.before_read(value)
        return value

    return type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})


class _EnterWait:
    """A forward pre-hook: wait for the buckets of the module's own parameters."""

    def __init__(self, waits: GatherWaits, slots: list[Slot]) -> None:
        self.waits, self.slots = waits, slots

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        self.waits.wait(self.slots)
