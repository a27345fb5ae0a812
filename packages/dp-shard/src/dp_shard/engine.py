"""One data-parallel interface over DDP, ZeRO-1/2 and ZeRO-3: the object a training loop holds.

A loop drives every mode the same way, once per optimizer step::

    engine.zero_grad()
    for each micro-batch and chunk:  # all but each chunk's last backward inside engine.no_sync(chunk)
        forward, backward
    engine.finish_grad_sync()  # each gradient element reduced once per step
    ...                        # model-parallel completion over engine.grad_of(param), if the model needs it
    norm, skipped = engine.step(max_norm, clip_groups, scaler)

:meth:`DataParallelEngine.step` is the one step protocol: unscale the gradients the optimizer steps on
with a world-wide overflow check (the scaler's groups), clip by the global norm over the mode's groups
(the model-parallel ones given, plus the data-parallel group where gradients are sharded), update the
loss scale, then the optimizer step (skipped on overflow or a non-finite norm) and, for ZeRO-1/2, the
parameter gathers.

The implementations differ only in where gradients live and which collectives reduce them:
:class:`DDPEngine` (each chunk in :class:`~dp_shard.DataParallel`, any ``torch.optim`` optimizer),
:class:`ZeroEngine` (:class:`~dp_shard.ShardedOptimizer`, stages 1 and 2) and :class:`FSDPEngine`
(:func:`~dp_shard.fully_shard` per chunk). :func:`make_engine` builds the one a ``zero`` stage names.
:meth:`DataParallelEngine.checkpoint_pieces` says, in one form for every mode, what a checkpoint saves
and loads (:mod:`dp_shard.engine_state`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import pstate

from .engine_state import CheckpointPieces
from .loss_scaler import LossScaler

GroupsFn = Callable[[dict[str, nn.Parameter]], list[dict[str, Any]]]
"""Param groups (dicts whose ``params`` are ``(name, parameter)`` pairs) from the named trainable
parameters the optimizer will see (for ZeRO-3: the pieces, under the original names)."""


@dataclass(frozen=True)
class ClipGroups:
    """The model-parallel groups the gradient norm is reduced over (``None``: not split there)."""

    tp: pstate.Group | None = None
    pp: pstate.Group | None = None
    ep: pstate.Group | None = None
    etp: pstate.Group | None = None


class DataParallelEngine(ABC):
    """What every data-parallel mode provides (see the module notes). ``modules`` are what the forward and
    backward run (wrapped or bare chunks); ``chunks`` the bare ones; ``named`` the optimizer's named
    parameters; ``optimizer`` holds the param groups (the learning rate is set there)."""

    zero: int
    loss_factor: float = 1.0
    """What the loop multiplies its loss by (and every gradient it injects besides, e.g. routers'
    auxiliary losses) for the step's gradient to be the data-parallel mean: ``1 / dp`` for an engine
    built with ``average=False`` (the reductions then sum, and the loss's scaling is the only division,
    a scalar), else 1 (the engine averages)."""
    chunks: list[nn.Module]
    modules: list[nn.Module]
    named: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def no_sync(self, chunk: int) -> AbstractContextManager[Any]:
        """Backward passes inside accumulate ``chunk``'s gradients without communicating."""

    @abstractmethod
    def finish_grad_sync(self) -> None:
        """Complete the step's gradient reduction (once per step, after the last backward)."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Zero the gradients before a step."""

    @abstractmethod
    def grad_of(self, param: nn.Parameter) -> torch.Tensor | None:
        """Where the reduced gradient of chunk parameter ``param`` is on this rank (its shard under ZeRO-1/2:
        ``None`` when this rank owns none of it)."""

    @abstractmethod
    def main_grads(self) -> list[torch.Tensor | None]:
        """The gradients the optimizer steps on (what the loss scaler unscales)."""

    @abstractmethod
    def clip_grad_norm_(self, max_norm: float, groups: ClipGroups) -> torch.Tensor:
        """Clip by the global norm over ``groups`` and the mode's own; return the norm."""

    def optimizer_step(self) -> None:
        """The optimizer's step (ZeRO-1/2: then the parameter gathers)."""
        self.optimizer.step()

    def wait_param_gather(self) -> None:
        """Wait for parameter gathers still in flight (ZeRO-1/2 overlapping them with the next forward):
        call it before reading the parameters other than through the chunks' forward."""
        return None

    def reload_model_params(self) -> None:
        """After loading weights into the parameters: copy them into the master weights where these are
        separate copies (16-bit parameters)."""
        return None

    def master(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer keys ``param``'s state by where it steps whole parameters (DDP: the fp32
        master of a 16-bit parameter); the parameter itself otherwise."""
        return param

    @abstractmethod
    def checkpoint_pieces(self) -> CheckpointPieces:
        """What a checkpoint saves and loads: each parameter's stored values and its optimizer state, by
        the names in :attr:`named`, as views ``ckpt`` fills in place (:mod:`dp_shard.engine_state`)."""

    @abstractmethod
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the model's parameters (``params``: the stored parameters, ZeRO-3's
        shards), their gradients (``grads``: buffers, shards, staging) and the optimizer (``optimizer``:
        its state and master copies), and ``numel``: the parameters' elements this rank's chunks hold
        unsharded (what bytes per parameter divide by). Optimizer state exists after the first step."""

    def bytes_per_param(self) -> dict[str, float]:
        """:meth:`memory_bytes` per parameter element (``total`` too)."""
        held = self.memory_bytes()
        out = {k: held[k] / held["numel"] for k in ("params", "grads", "optimizer")}
        return out | {"total": sum(out.values())}

    def step(self, max_norm: float, groups: ClipGroups, scaler: LossScaler | None = None) -> tuple[float, bool]:
        """The step protocol (module notes); returns the global gradient norm and whether it was skipped."""
        found_inf = scaler is not None and scaler.unscale_(self.main_grads())
        norm = float(self.clip_grad_norm_(max_norm, groups))
        skipped = found_inf or not math.isfinite(norm)
        if scaler is not None:
            scaler.update(found_inf)
        if not skipped:
            self.optimizer_step()
        return norm, skipped
