"""The state one :class:`~pp_sched.PipelineExecutor` step works on: what it returns (``StepResult``), the
activation sets it holds, the microbatch feeds, and this rank's plan entries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PipelineScheduleError
from .p2p import Pending
from .plan import Message, Step
from .split_backward import SavedTensors, WeightGradient


@dataclass
class StepResult:
    """What one :meth:`PipelineExecutor.step` or :meth:`~PipelineExecutor.evaluate` did on this rank.

    ``losses``: the unscaled loss of each microbatch, in microbatch order, on the rank that holds the last
    stage (empty elsewhere). ``outputs``: the last stage's outputs per microbatch (``evaluate`` only).
    ``peak_activations``: the most ``(microbatch, chunk)`` activation sets held at once (from ``F`` to its
    ``B`` or ``I``); ``peak_pending_w``: the most sets whose ``I`` ran and ``W`` not yet (each holds only
    what ``W`` needs). ``compute_s``: seconds spent computing (forward, loss, backward); ``wall_s``:
    seconds the whole step took.
    """

    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    peak_activations: int = 0
    peak_pending_w: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class _Held:
    """One ``(microbatch, chunk)`` activation set: what its backward starts from."""

    inputs: tuple[torch.Tensor, ...]  # received floating-point leaves whose gradients go back
    outputs: tuple[torch.Tensor, ...]  # floating-point outputs (the scaled loss on the last stage)
    saved: SavedTensors | None = None  # what autograd saved, for a split backward
    run: Any = None  # a staged chunk's run (overlap=True), whose backward goes step by step


class _Feed:
    """Microbatches from a list or an iterator, taken once each by index."""

    def __init__(self, source: Iterable[Any] | None, name: str, count: int):
        self._iter = None if source is None else iter(source)
        self._cache: dict[int, Any] = {}
        self._next = 0
        self._name, self._count = name, count

    @property
    def given(self) -> bool:
        return self._iter is not None

    def take(self, microbatch: int) -> Any:
        if self._iter is None:
            raise PipelineScheduleError(f"this rank needs {self._name} (microbatch {microbatch}) but got none")
        while microbatch not in self._cache:
            try:
                self._cache[self._next] = next(self._iter)
            except StopIteration:
                raise PipelineScheduleError(
                    f"{self._name} ran out at microbatch {self._next}; the schedule has {self._count} microbatches"
                ) from None
            self._next += 1
        return self._cache.pop(microbatch)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _single(values: Any) -> Any:
    """A staged run's outputs as the chunk would return them (a 1-tuple is one tensor)."""
    return values[0] if isinstance(values, tuple) and len(values) == 1 else values


def _floats(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tensors if t.is_floating_point())


Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class _Op:
    """One step of this rank's plan with what the executor needs to know about it, computed once."""

    step: Step
    stage: int
    first: bool  # the stage is stage 0 (its input is the microbatch)
    last: bool  # the stage is the last one (its output goes to the loss)
    final: bool  # the chunk's last backward (B or W) of the step: its gradients are complete after it


@dataclass
class _StepState:
    """Everything one :meth:`PipelineExecutor.step` or ``evaluate`` changes while it runs."""

    train: bool
    inputs: _Feed
    targets: _Feed
    result: StepResult = field(default_factory=StepResult)
    held: dict[tuple[int, int], _Held] = field(default_factory=dict)  # (microbatch, chunk) -> activations
    pending_w: dict[tuple[int, int], WeightGradient] = field(default_factory=dict)
    posted: dict[Message, tuple[Pending, int]] = field(default_factory=dict)  # receive -> its batch, index
    local: dict[Message, Tensors] = field(default_factory=dict)  # handed over on this rank (V turn)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)
