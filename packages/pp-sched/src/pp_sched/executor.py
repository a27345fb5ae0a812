"""``PipelineExecutor``: run exactly one rank's actions of a :class:`~pp_sched.Schedule` on its model chunks.

Per action, in the schedule's order:

- ``F``: take the microbatch (stage 0) or the received activations, run the chunk, send the output on
  (or, on the last stage, compute the loss), and hold the activations for the backward.
- ``B``: backpropagate the received output gradient (on the last stage: ``loss / microbatches``) into
  the parameters' ``.grad`` and the stage input, send the input gradient back, free the activations.
- ``I``: the input gradient only (``torch.autograd.grad`` with ``retain_graph``), sent back at once.
- ``W``: later, the parameter gradients of that microbatch (accumulated into ``.grad``); frees it.

After action ``k`` one batch sends its outputs and posts the receives action ``k + 1`` needs (like
Megatron's ``send_forward_recv_backward``); on CPU (gloo) those receives are posted before action ``k``
runs when their shapes are known, so the data arrives during the compute. Sends are never waited for
before the end of the step, so a rank waits only for data it needs: any schedule that
:func:`~pp_sched.validate` accepts runs without deadlock, and a schedule it refuses is refused before
any communication.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pstate import Group

from .action import Action, Schedule
from .errors import PipelineScheduleError
from .p2p import BACKWARD, FORWARD, Pending, StageP2P, TensorSpec
from .plan import SHAPE, Message, posting_order
from .simulate import validate
from .split_backward import SavedTensors, WeightGradient, input_backward


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


def _floats(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tensors if t.is_floating_point())


class PipelineExecutor:
    """Runs exactly ``schedule.actions[rank]`` for this pipeline rank on its model chunks.

    Args:
        schedule: checked with :func:`~pp_sched.validate` here, before any communication.
        chunks: one module per virtual chunk; chunk ``c`` holds stage ``c * pp + rank``. A chunk is called
            with the stage's input tensors as positional arguments and returns a tensor or a tuple.
        group: the pipeline group (a ``pstate`` axis or a process group) of ``schedule.pp`` ranks.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without targets) on the last stage;
            a scalar, the mean over the microbatch. Required by :meth:`step`.
        no_sync: ``no_sync(chunk)`` returns a context manager that the executor enters around every
            backward (``B`` or ``W``) of ``chunk`` except the last one of the step, so a data-parallel
            wrapper can skip gradient synchronisation until the gradients are complete.
        on_chunk_grads_ready: called with the chunk index right after its last backward of the step,
            when that chunk's ``.grad`` are final (a data-parallel all-reduce can start there).
        specs: declare the tensors of every stage-to-stage message instead of exchanging shapes once.
        device: where received tensors go (default: the first chunk's parameters' device).
    """

    def __init__(
        self,
        schedule: Schedule,
        chunks: Sequence[nn.Module],
        group: Group,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        no_sync: Callable[[int], AbstractContextManager[Any]] | None = None,
        on_chunk_grads_ready: Callable[[int], None] | None = None,
        specs: Sequence[TensorSpec] | None = None,
        device: torch.device | None = None,
    ):
        validate(schedule)
        chunks = list(chunks)
        if len(chunks) != schedule.vpp:
            raise PipelineScheduleError(f"got {len(chunks)} model chunks but the schedule has vpp={schedule.vpp}")
        if device is None:
            device = next((p.device for c in chunks for p in c.parameters()), None)
        self.schedule = schedule
        self.chunks = chunks
        self.loss_fn = loss_fn
        self.no_sync = no_sync
        self.on_chunk_grads_ready = on_chunk_grads_ready
        self.p2p = StageP2P(group, pp=schedule.pp, vpp=schedule.vpp, specs=specs, device=device)
        self.rank = self.p2p.rank
        self.actions: tuple[Action, ...] = schedule.actions[self.rank]
        self._last_backward = {a.chunk: k for k, a in enumerate(self.actions) if a.kind in "BW"}
        self._declared = specs is not None

    def step(self, inputs: Iterable[Any] | None = None, targets: Iterable[Any] | None = None) -> StepResult:
        """Run the schedule once: forwards and backwards of every microbatch, gradients accumulated into
        ``.grad`` as the gradient of the mean of the microbatch losses. ``inputs`` (one item per
        microbatch: a tensor or a tuple of tensors) are needed on the rank holding stage 0, ``targets``
        on the rank holding the last stage; other ranks may pass ``None``."""
        if self.loss_fn is None:
            raise PipelineScheduleError("step() needs a loss_fn; use evaluate() for forward-only runs")
        if not torch.is_grad_enabled():
            raise PipelineScheduleError("step() runs backwards and needs grad mode; use evaluate() under no_grad")
        return self._execute(self.actions, inputs, targets, train=True)

    def evaluate(self, inputs: Iterable[Any] | None = None, targets: Iterable[Any] | None = None) -> StepResult:
        """Forward only, without autograd: the schedule's ``F`` actions in their order. Returns the last
        stage's outputs, and its losses when a ``loss_fn`` was given."""
        with torch.no_grad():
            return self._execute(tuple(a for a in self.actions if a.kind == "F"), inputs, targets, train=False)

    # -- the loop --

    def _execute(
        self, actions: Sequence[Action], inputs: Iterable[Any] | None, targets: Iterable[Any] | None, train: bool
    ) -> StepResult:
        start = time.perf_counter()
        m = self.schedule.microbatches
        feeds = (_Feed(inputs, "inputs", m), _Feed(targets, "targets", m))
        result = StepResult()
        losses: dict[int, torch.Tensor] = {}
        outputs: dict[int, Any] = {}
        held: dict[tuple[int, int], _Held] = {}
        pending_w: dict[tuple[int, int], WeightGradient] = {}
        plan = posting_order(self.schedule, self.rank, train=train, declared=self._declared)
        if [step.action for step in plan] != list(actions):  # posting_order is derived from the same actions
            raise PipelineScheduleError("the posting order does not follow this rank's actions")
        posted: dict[Message, tuple[Pending, int]] = {}
        # On CPU (gloo: one request per operation) the receives of the next action are posted before the
        # compute they wait behind, when their shapes are known, so their data arrives meanwhile; elsewhere
        # (NCCL, which runs a rank's batches in order) they go with the sends, in the batches that
        # pp_sched.plan checks cannot hang.
        early = self.p2p.device.type == "cpu"
        self._post(plan[0].recvs if plan else (), [], posted)
        for k, step in enumerate(plan):
            action = step.action
            received: list[tuple[torch.Tensor, ...]] = []
            if step.needs is not None:
                pending, index = posted.pop(step.needs)
                received = [pending.wait()[index]]
            following = plan[k + 1].recvs if k + 1 < len(plan) else ()
            ahead = early and all(m.kind != SHAPE and self.p2p.knows_shapes(*self._receive(m)[:2]) for m in following)
            if ahead:
                self._post(following, [], posted)
            begin = time.perf_counter()
            if action.kind == "F":
                sends = self._forward(action, received, feeds, held, losses, outputs, train)
            else:
                sends = self._backward(k, action, received, held, pending_w)
            result.peak_activations = max(result.peak_activations, len(held))
            result.peak_pending_w = max(result.peak_pending_w, len(pending_w))
            result.compute_s += time.perf_counter() - begin
            self._post(() if ahead else following, sends, posted)
        self.p2p.wait_sends()
        if held or pending_w:  # validate() makes this impossible; a guard against a changed schedule
            raise PipelineScheduleError(f"activations of {sorted(held) + sorted(pending_w)} were never freed")
        result.losses = [losses[mb] for mb in sorted(losses)]
        result.outputs = [outputs[mb] for mb in sorted(outputs)]
        result.wall_s = time.perf_counter() - start
        return result

    def _receive(self, message: Message) -> tuple[str, int, int]:
        """``message`` as a receive of :meth:`StageP2P.exchange`: direction, this rank's stage, microbatch."""
        stage = message.boundary + 1 if message.kind == FORWARD else message.boundary
        return (message.kind, stage, message.microbatch)

    def _post(
        self,
        recvs: Sequence[Message],
        sends: list[tuple[str, int, int, tuple[torch.Tensor, ...]]],
        posted: dict[Message, tuple[Pending, int]],
    ) -> None:
        """One batch: ``sends`` and the receives of ``recvs`` in their order (a shape message is posted by
        :class:`StageP2P` itself, right before the first activation of its boundary)."""
        data = [m for m in recvs if m.kind != SHAPE]
        if not data and not sends:
            return
        pending = self.p2p.exchange(sends, [self._receive(m) for m in data])
        for index, message in enumerate(data):
            posted[message] = (pending, index)

    def _stage(self, action: Action) -> int:
        return self.schedule.stage_of(self.rank, action.chunk)

    def _forward(
        self,
        action: Action,
        received: list[tuple[torch.Tensor, ...]],
        feeds: tuple[_Feed, _Feed],
        held: dict[tuple[int, int], _Held],
        losses: dict[int, torch.Tensor],
        outputs: dict[int, Any],
        train: bool,
    ) -> list[tuple[str, int, int, tuple[torch.Tensor, ...]]]:
        mb, stage = action.microbatch, self._stage(action)
        if stage == 0:
            args, leaves = _as_tuple(feeds[0].take(mb)), ()
        else:
            args = received[0]
            leaves = tuple(t.requires_grad_() for t in _floats(args)) if train else ()
        saved = SavedTensors() if train and self.schedule.split_backward else None
        with saved.recording() if saved is not None else contextlib.nullcontext():
            output = self.chunks[action.chunk](*args)
            if stage < self.schedule.num_stages - 1:
                sent = _as_tuple(output)
                if train:
                    held[(mb, action.chunk)] = _Held(leaves, _floats(sent), saved)
                return [(FORWARD, stage, mb, sent)]
            if not train:
                outputs[mb] = output
            if self.loss_fn is not None:
                target = feeds[1].take(mb) if feeds[1].given else None
                loss = self.loss_fn(output) if target is None else self.loss_fn(output, target)
                losses[mb] = loss.detach()
                if train:
                    held[(mb, action.chunk)] = _Held(leaves, (loss / self.schedule.microbatches,), saved)
        return []

    def _backward(
        self,
        k: int,
        action: Action,
        received: list[tuple[torch.Tensor, ...]],
        held: dict[tuple[int, int], _Held],
        pending_w: dict[tuple[int, int], WeightGradient],
    ) -> list[tuple[str, int, int, tuple[torch.Tensor, ...]]]:
        mb, chunk, stage = action.microbatch, action.chunk, self._stage(action)
        key = (mb, chunk)
        if action.kind in "BI":
            entry = held.pop(key)
            last = stage == self.schedule.num_stages - 1
            grads = (None,) * len(entry.outputs) if last else received[0]
            pairs = [(o, g) for o, g in zip(entry.outputs, grads) if o.requires_grad]
            outs, out_grads = [o for o, _ in pairs], [g for _, g in pairs]
        if action.kind == "I":  # the input gradient only; W later runs what it captured
            input_grads, pending_w[key] = input_backward(outs, out_grads, entry.inputs, entry.saved)
            return self._send_back(stage, mb, entry.inputs, input_grads)
        final = self._last_backward[chunk] == k
        sync = self.no_sync(chunk) if self.no_sync is not None and not final else contextlib.nullcontext()
        with sync:
            if action.kind == "W":
                pending_w.pop(key).run()
            elif outs:
                torch.autograd.backward(outs, out_grads)
        if final and self.on_chunk_grads_ready is not None:
            self.on_chunk_grads_ready(chunk)
        if action.kind == "W":
            return []
        return self._send_back(stage, mb, entry.inputs, [x.grad for x in entry.inputs])

    @staticmethod
    def _send_back(
        stage: int, mb: int, inputs: tuple[torch.Tensor, ...], grads: Sequence[torch.Tensor | None]
    ) -> list[tuple[str, int, int, tuple[torch.Tensor, ...]]]:
        """The input-gradient message to the previous stage (zeros where an input got no gradient)."""
        if stage == 0:
            return []
        grads = list(grads) or [None] * len(inputs)
        return [(BACKWARD, stage, mb, tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)))]
