"""All-to-all overlapped with another microbatch's compute: a forward cut into stages, run step by step.

A microbatch's pass through some layers is a list of *pieces*: :class:`Compute` (a function from a tuple
of tensors to a tuple of tensors: attention, routing, experts, ...) and :class:`Exchange` (an EP
all-to-all of the tuple's last tensor, the others passed through). :class:`StagedRun` runs them with
each compute piece on detached inputs (so each piece has its own autograd graph) and each exchange
asynchronous (``async_op=True``): its forward and its backward are generators that stop right after
launching an exchange and, when resumed, wait for it and compute up to the next one. The backward walks
the pieces in reverse: a compute piece backpropagates its outputs' gradients into its inputs (and the
parameters' ``.grad``); an exchange sends the gradient back by the reverse all-to-all, also async.

:func:`interleave` advances several such generators in turn, so one microbatch's all-to-all is in
flight while the other computes: a forward with a forward, or (1F1B's steady state, DualPipe-V's pairs)
a forward with another microbatch's backward. Run alone, a generator waits for each all-to-all at once:
the same operations in the same order, so overlap on and off give bitwise equal results.

Why a stage-wise backward rather than autograd functions whose backward launches asynchronously: the
autograd engine needs each function's gradient when the function returns, so a backward cannot leave
its all-to-all in flight while other work runs; cutting the graph at the exchanges gives the scheduler
the points where it may switch to the other microbatch (Megatron's combined 1F1B and DeepSeek's
DualPipe cut a layer the same way). Every rank of the EP group must run the same pieces in the same
order (they do: they hold the same pipeline stage and run the same schedule).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from pstate import comm as pcomm
from pstate import interleave

from .comm import GroupOrNone, size_of
from .errors import MoEError

Tensors = tuple[torch.Tensor, ...]


@dataclass
class Compute:
    """A compute piece: ``fn(values) -> values`` (tuples of tensors)."""

    fn: Callable[[Tensors], Tensors]
    name: str = "compute"


@dataclass
class Exchange:
    """An all-to-all over ``group`` of the last value: ``splits()`` gives ``(rows received from, rows sent
    to)`` each rank, asked when the exchange starts (after the pieces before it ran)."""

    splits: Callable[[], tuple[list[int], list[int]]]
    group: GroupOrNone
    name: str = "all-to-all"


Stage = Compute | Exchange


def chain(*parts: Stage | Iterable[Stage]) -> list[Stage]:
    """The pieces in order, with neighbouring compute pieces merged into one (fewer graph cuts)."""
    flat: list[Stage] = []
    for part in parts:
        flat.extend([part] if isinstance(part, (Compute, Exchange)) else part)
    out: list[Stage] = []
    for piece in flat:
        if isinstance(piece, Compute) and out and isinstance(out[-1], Compute):
            first, second = out[-1].fn, piece.fn
            out[-1] = Compute(lambda v, f=first, g=second: g(f(v)), f"{out[-1].name}+{piece.name}")
        else:
            out.append(piece)
    return out


@dataclass
class OverlapTimes:
    """Per-rank seconds: ``compute_s`` in compute pieces, ``wait_s`` in all-to-all calls (launching one and
    waiting for it), ``a2a_s`` from each all-to-all's launch to its completion, ``hidden_s`` the part of
    that between the launch call's return and the wait's start (communication in flight while this rank
    did other work), ``exchanges`` counted."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    a2a_s: float = 0.0
    hidden_s: float = 0.0
    exchanges: int = 0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _InFlight:
    """One launched all-to-all: its output buffer, work object and timing."""

    def __init__(self, x: torch.Tensor, out_rows: list[int], in_rows: list[int], group: GroupOrNone, times):
        self.times, self.x = times, x.contiguous()
        self.out = x.new_empty((sum(out_rows), *x.shape[1:]))
        self.began, self.done_at = time.perf_counter(), None
        if size_of(group) == 1:
            self.out.copy_(self.x)
            self.work = None
            self.done_at = self.launched = self.began
            return
        self.work = pcomm.all_to_all_single(self.out, self.x, out_rows, in_rows, group=group, async_op=True)
        self.launched = time.perf_counter()
        if times is not None:
            future = getattr(self.work, "get_future", None)
            if future is not None:
                future().add_done_callback(self._stamp)

    def _stamp(self, _future: Any) -> None:
        self.done_at = time.perf_counter()

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        end = time.perf_counter()
        t = self.times
        if t is not None:
            done = min(self.done_at or end, end)
            t.wait_s += end - start + self.launched - self.began
            t.a2a_s += done - self.began
            t.hidden_s += max(0.0, min(done, start) - self.launched)
            t.exchanges += 1
        self.x = None
        return self.out


def _leaf(value: torch.Tensor) -> torch.Tensor:
    """A detached copy-free leaf of ``value`` that collects its gradient when ``value`` needs one."""
    leaf = value.detach()
    return leaf.requires_grad_() if value.requires_grad else leaf


Steps = Generator[None, None, Tensors]


class StagedRun:
    """One microbatch through ``pieces``: :meth:`forward`, then :meth:`backward`, each a generator of steps
    (see the module). ``times``: an :class:`OverlapTimes` to add this run's seconds to."""

    def __init__(self, pieces: Sequence[Stage], times: OverlapTimes | None = None) -> None:
        if not pieces or not isinstance(pieces[-1], Compute):
            raise MoEError("StagedRun: the pieces must end with a Compute piece (its outputs start the backward)")
        self.pieces, self.times = list(pieces), times
        self._inputs: Tensors = ()
        self._saved: list[Any] = []
        self.outputs: Tensors | None = None

    def _compute(self, piece: Compute, values: Tensors) -> Tensors:
        begin = time.perf_counter()
        leaves = tuple(_leaf(v) for v in values)
        out = tuple(piece.fn(leaves))
        self._saved.append((leaves, out))
        if self.times is not None:
            self.times.compute_s += time.perf_counter() - begin
        return out

    def forward(self, *inputs: torch.Tensor) -> Steps:
        """Steps of the forward; returns (as the generator's value, also kept in :attr:`outputs`) the
        last piece's outputs, connected to autograd from that piece's inputs on."""
        self._inputs, values = inputs, tuple(inputs)
        for piece in self.pieces:
            if isinstance(piece, Compute):
                values = self._compute(piece, values)
                continue
            recv, send = piece.splits()
            flight = _InFlight(values[-1].detach(), recv, send, piece.group, self.times)
            self._saved.append((recv, send))
            yield
            received = flight.wait()
            values = (*values[:-1], received.requires_grad_(values[-1].requires_grad))
        self.outputs = values
        return values

    def backward(self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> Steps:
        """Steps of the backward from ``outputs`` (the run's outputs, or tensors computed from them, such as
        a loss) with ``grads`` (``None`` for a scalar loss). Parameter gradients accumulate into ``.grad``;
        the inputs' gradients go on into whatever produced them (a leaf's ``.grad``). Returns the inputs'
        gradients (``None`` where an input needs none)."""
        if self.outputs is None:
            raise MoEError("StagedRun.backward: run forward first")
        pending = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        carried: list[torch.Tensor | None] = []
        for index in range(len(self.pieces) - 1, -1, -1):
            piece, saved = self.pieces[index], self._saved[index]
            if isinstance(piece, Compute):
                begin = time.perf_counter()
                leaves, outs = saved
                if index != len(self.pieces) - 1:
                    pending = [(o, g) for o, g in zip(outs, carried) if g is not None and o.requires_grad]
                if pending:
                    torch.autograd.backward([o for o, _ in pending], [g for _, g in pending])
                carried = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
                if self.times is not None:
                    self.times.compute_s += time.perf_counter() - begin
                continue
            recv, send = saved
            grad = carried[-1]
            if grad is None:  # the received rows fed nothing that needs a gradient
                grad = torch.zeros(sum(recv), *self._row_shape(index), dtype=self._row_dtype(index))
            flight = _InFlight(grad, send, recv, piece.group, self.times)
            yield
            carried[-1] = flight.wait()
        self._saved.clear()
        live = [(x, g) for x, g in zip(self._inputs, carried) if g is not None and x.requires_grad]
        if live:
            torch.autograd.backward([x for x, _ in live], [g for _, g in live])
        return tuple(carried)

    def _row_shape(self, exchange: int) -> tuple[int, ...]:
        leaves, _ = self._saved[exchange + 1]
        return tuple(leaves[-1].shape[1:])

    def _row_dtype(self, exchange: int) -> torch.dtype:
        leaves, _ = self._saved[exchange + 1]
        return leaves[-1].dtype


def run(steps: Steps) -> Tensors:
    """Run one generator to the end (each all-to-all waited for at once); its value."""
    return interleave(steps)[0]
