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
runs when their shapes are known, so the data arrives during the compute. A DualPipe-V pair (a forward
and a backward of another microbatch, ``Schedule.pairs``) thus sends the forward's output and receives
the backward's gradient in one batch, and the gradient arrives while the forward computes. Sends are
never waited for before the end of the step, so a rank waits only for data it needs: any schedule that
:func:`~pp_sched.validate` accepts runs without deadlock, and a schedule it refuses is refused before
any communication. A message whose two stages share a rank (the turn of a V) is handed over in memory.

The posting plan (:mod:`pp_sched.plan`) is derived once per mode (training, evaluation) and kept; a
step's Python work is a walk over this rank's actions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from pstate import Group, interleave

from .action import Action, Schedule
from .errors import PipelineScheduleError
from .overlap import can_stage, merge_split_backward
from .p2p import StageP2P, TensorSpec
from .plan import SHAPE, Message, posting_orders
from .simulate import validate
from .split_backward import SavedTensors, input_backward
from .step_state import StepResult, Tensors, _as_tuple, _Feed, _floats, _Held, _Op, _single, _StepState


class PipelineExecutor:
    """Runs exactly ``schedule.actions[rank]`` for this pipeline rank on its model chunks.

    Args:
        schedule: checked with :func:`~pp_sched.validate` here, before any communication.
        chunks: one module per virtual chunk; chunk ``c`` holds stage ``schedule.stage_of(rank, c)``. A
            chunk is called with the stage's input tensors as positional arguments and returns a tensor
            or a tuple.
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
        overlap: run chunks that have ``staged_run()`` (see :mod:`pp_sched.overlap`) step by step, and each
            pair of ``schedule.pairs`` whose chunks both have it as one unit, the forward and the backward
            interleaved so that one's communication (MoE all-to-alls) travels while the other computes.
            Both inputs of a pair are received before it starts and both outputs sent after it
            (:func:`~pp_sched.validate` checks that pairs can run so). A split backward (``I``, ``W``) of
            such a schedule runs as one ``B`` at the ``I``. Pairs of other chunks, and with ``pp > 1`` pairs on
            devices other than CPU (where receives go in the plan's checked batches), run one action after
            the other.
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
        overlap: bool = False,
    ):
        chunks = list(chunks)
        self._staged = tuple(overlap and can_stage(c) for c in chunks)
        if any(self._staged):
            schedule = merge_split_backward(schedule)
        validate(schedule)
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
        self._declared = specs is not None
        self._programs: dict[bool, tuple[_Op, ...]] = {}  # train -> this rank's plan, derived once
        self._pairs = frozenset(
            k
            for k in schedule.pairs[self.rank]
            if self._staged[self.actions[k].chunk] and self._staged[self.actions[k + 1].chunk]
        )
        self._run: dict[str, Callable[[_StepState, _Op, Tensors], Tensors | None]] = {
            "F": self._forward,
            "B": self._backward,
            "I": self._input_grad,
            "W": self._weight_grad,
        }

    def step(self, inputs: Iterable[Any] | None = None, targets: Iterable[Any] | None = None) -> StepResult:
        """Run the schedule once: forwards and backwards of every microbatch, gradients accumulated into
        ``.grad`` as the gradient of the mean of the microbatch losses. ``inputs`` (one item per
        microbatch: a tensor or a tuple of tensors) are needed on the rank holding stage 0, ``targets``
        on the rank holding the last stage; other ranks may pass ``None``."""
        if self.loss_fn is None:
            raise PipelineScheduleError("step() needs a loss_fn; use evaluate() for forward-only runs")
        if not torch.is_grad_enabled():
            raise PipelineScheduleError("step() runs backwards and needs grad mode; use evaluate() under no_grad")
        return self._execute(inputs, targets, train=True)

    def evaluate(self, inputs: Iterable[Any] | None = None, targets: Iterable[Any] | None = None) -> StepResult:
        """Forward only, without autograd: the schedule's ``F`` actions in their order. Returns the last
        stage's outputs, and its losses when a ``loss_fn`` was given."""
        with torch.no_grad():
            return self._execute(inputs, targets, train=False)

    def program(self, train: bool = True) -> tuple[_Op, ...]:
        """This rank's steps for training or evaluation, derived from the schedule on first use and kept."""
        if train not in self._programs:
            plan = posting_orders(self.schedule, train=train, declared=self._declared)[self.rank]
            expected = [a for a in self.actions if train or a.kind == "F"]
            if [step.action for step in plan] != expected:  # derived from the same actions; a guard
                raise PipelineScheduleError("the posting order does not follow this rank's actions")
            last_backward = {a.chunk: k for k, a in enumerate(expected) if a.kind in "BW"}
            ops = []
            for k, step in enumerate(plan):
                stage = self.schedule.stage_of(self.rank, step.action.chunk)
                ops.append(
                    _Op(
                        step,
                        stage,
                        first=stage == 0,
                        last=stage == self.schedule.num_stages - 1,
                        final=last_backward.get(step.action.chunk) == k,
                    )
                )
            self._programs[train] = tuple(ops)
        return self._programs[train]

    # -- the loop --

    def _execute(self, inputs: Iterable[Any] | None, targets: Iterable[Any] | None, train: bool) -> StepResult:
        start = time.perf_counter()
        m = self.schedule.microbatches
        ops = self.program(train)
        state = _StepState(train, _Feed(inputs, "inputs", m), _Feed(targets, "targets", m))
        result = state.result
        # On CPU (gloo: one request per operation) the receives of the next action are posted before the
        # compute they wait behind, when their shapes are known, so their data arrives meanwhile; elsewhere
        # (NCCL, which runs a rank's batches in order) they go with the sends, in the batches that
        # pp_sched.plan checks cannot hang.
        early = self.p2p.device.type == "cpu"
        solo = self.schedule.pp == 1  # no p2p: a pair can run as a unit on any device
        if ops:
            self._post(state, ops[0].step.recvs, ())
        k = 0
        while k < len(ops):
            if train and (early or solo) and k in self._pairs and self._post_pair(state, ops[k + 1]):
                k = self._run_pair(state, ops, k)
                continue
            op = ops[k]
            k += 1
            step = op.step
            received = self._take(state, step.needs)
            following = ops[k].step.recvs if k < len(ops) else ()
            ahead = early and all(m.kind != SHAPE and self.p2p.knows_shapes(m) for m in following)
            if ahead:
                self._post(state, following, ())
            begin = time.perf_counter()
            produced = self._run[step.action.kind](state, op, received)
            result.compute_s += time.perf_counter() - begin
            result.peak_activations = max(result.peak_activations, len(state.held))
            result.peak_pending_w = max(result.peak_pending_w, len(state.pending_w))
            sends: tuple[tuple[Message, Tensors], ...] = ()
            if produced is not None and step.out is not None:
                if step.out.local:
                    state.local[step.out] = produced
                else:
                    sends = ((step.out, produced),)
            self._post(state, () if ahead else following, sends)
        self.p2p.wait_sends()
        if state.held or state.pending_w:  # validate() makes this impossible; a guard against a changed schedule
            raise PipelineScheduleError(
                f"activations of {sorted(state.held) + sorted(state.pending_w)} were never freed"
            )
        result.losses = [state.losses[mb] for mb in sorted(state.losses)]
        result.outputs = [state.outputs[mb] for mb in sorted(state.outputs)]
        result.wall_s = time.perf_counter() - start
        return result

    def _post(self, state: _StepState, recvs: Sequence[Message], sends: Sequence[tuple[Message, Tensors]]) -> None:
        """One batch: ``sends`` and the receives of ``recvs`` in their order (a shape message is posted by
        :class:`StageP2P` itself, right before the first activation of its boundary)."""
        data = [m for m in recvs if m.kind != SHAPE]
        if not data and not sends:
            return
        pending = self.p2p.exchange(sends, data)
        for index, message in enumerate(data):
            state.posted[message] = (pending, index)

    def _post_pair(self, state: _StepState, second: _Op) -> bool:
        """Post the receives of a pair's second action ahead of the pair, if their shapes are known."""
        if not all(m.kind != SHAPE and self.p2p.knows_shapes(m) for m in second.step.recvs):
            return False
        self._post(state, second.step.recvs, ())
        return True

    def _run_pair(self, state: _StepState, ops: tuple[_Op, ...], k: int) -> int:
        """Run ``ops[k]`` (a forward) and ``ops[k + 1]`` (a backward) interleaved; both outputs are sent after
        both ran. Returns the index of the next op."""
        first, second, result = ops[k], ops[k + 1], state.result
        received = self._take(state, first.step.needs), self._take(state, second.step.needs)
        following = ops[k + 2].step.recvs if k + 2 < len(ops) else ()
        ahead = all(m.kind != SHAPE and self.p2p.knows_shapes(m) for m in following)
        if ahead:
            self._post(state, following, ())
        begin = time.perf_counter()
        produced = self._pair(state, first, received[0], second, received[1])
        result.compute_s += time.perf_counter() - begin
        result.peak_activations = max(result.peak_activations, len(state.held) + 1)  # both sets were held
        sends = []
        for op, out in zip((first, second), produced):
            if out is not None and op.step.out is not None:
                if op.step.out.local:
                    state.local[op.step.out] = out
                else:
                    sends.append((op.step.out, out))
        self._post(state, () if ahead else following, sends)
        return k + 2

    def _pair(
        self, state: _StepState, first: _Op, got_first: Tensors, second: _Op, got_second: Tensors
    ) -> tuple[Tensors | None, Tensors | None]:
        """The forward ``first`` and the backward ``second`` of two staged chunks' runs, interleaved."""
        args, leaves = self._forward_args(state, first, got_first)
        run = self.chunks[first.step.action.chunk].staged_run()
        entry, outs, out_grads = self._gradients(state, second, got_second)
        with self._sync(second):
            output, _ = interleave(run.forward(*args), entry.run.backward(outs, out_grads))
        self._grads_ready(second)
        sent = self._forward_done(state, first, _single(output), leaves, None, run)
        return sent, self._input_grads(second, entry.inputs, [x.grad for x in entry.inputs])

    @staticmethod
    def _take(state: _StepState, need: Message | None) -> Tensors:
        """The tensors of the message an action waits for (empty when it needs none)."""
        if need is None:
            return ()
        if need.local:
            return state.local.pop(need)
        pending, index = state.posted.pop(need)
        return pending.wait()[index]

    # -- the actions: each returns what it sends (its output or input gradient), or None --

    def _forward(self, state: _StepState, op: _Op, received: Tensors) -> Tensors | None:
        args, leaves = self._forward_args(state, op, received)
        chunk, run = self.chunks[op.step.action.chunk], None
        if state.train and self._staged[op.step.action.chunk]:
            run = chunk.staged_run()
            output, saved = _single(interleave(run.forward(*args))[0]), None
            return self._forward_done(state, op, output, leaves, saved, run)
        saved = SavedTensors() if state.train and self.schedule.split_backward else None
        with saved.recording() if saved is not None else contextlib.nullcontext():
            return self._forward_done(state, op, chunk(*args), leaves, saved, None)

    @staticmethod
    def _forward_args(state: _StepState, op: _Op, received: Tensors) -> tuple[Tensors, Tensors]:
        """A forward's chunk arguments and the received leaves whose gradients go back."""
        if op.first:
            return _as_tuple(state.inputs.take(op.step.action.microbatch)), ()
        args = received if not op.step.needs.local else tuple(t.detach() for t in received)
        return args, tuple(t.requires_grad_() for t in _floats(args)) if state.train else ()

    def _forward_done(
        self, state: _StepState, op: _Op, output: Any, leaves: Tensors, saved: SavedTensors | None, run: Any
    ) -> Tensors | None:
        """Hold a forward's activations and return what it sends, or (last stage) take its loss."""
        mb, chunk, train = op.step.action.microbatch, op.step.action.chunk, state.train
        if not op.last:
            sent = _as_tuple(output)
            if train:
                state.held[(mb, chunk)] = _Held(leaves, _floats(sent), saved, run)
            return sent
        if not train:
            state.outputs[mb] = output
        if self.loss_fn is not None:
            target = state.targets.take(mb) if state.targets.given else None
            loss = self.loss_fn(output) if target is None else self.loss_fn(output, target)
            state.losses[mb] = loss.detach()
            if train:
                state.held[(mb, chunk)] = _Held(leaves, (loss / self.schedule.microbatches,), saved, run)
        return None

    def _gradients(self, state: _StepState, op: _Op, received: Tensors) -> tuple[_Held, list, list]:
        """The activation set a backward starts from, its outputs that need a gradient, and those gradients."""
        entry = state.held.pop((op.step.action.microbatch, op.step.action.chunk))
        grads = (None,) * len(entry.outputs) if op.last else received
        pairs = [(o, g) for o, g in zip(entry.outputs, grads) if o.requires_grad]
        return entry, [o for o, _ in pairs], [g for _, g in pairs]

    def _backward(self, state: _StepState, op: _Op, received: Tensors) -> Tensors | None:
        """``B``: the whole backward into ``.grad`` and the stage input."""
        entry, outs, out_grads = self._gradients(state, op, received)
        with self._sync(op):
            if entry.run is not None:
                interleave(entry.run.backward(outs, out_grads))
            elif outs:
                torch.autograd.backward(outs, out_grads)
        self._grads_ready(op)
        return self._input_grads(op, entry.inputs, [x.grad for x in entry.inputs])

    def _input_grad(self, state: _StepState, op: _Op, received: Tensors) -> Tensors | None:
        """``I``: the input gradient only; ``W`` later runs what it captured."""
        entry, outs, out_grads = self._gradients(state, op, received)
        key = (op.step.action.microbatch, op.step.action.chunk)
        grads, state.pending_w[key] = input_backward(outs, out_grads, entry.inputs, entry.saved)
        return self._input_grads(op, entry.inputs, grads)

    def _weight_grad(self, state: _StepState, op: _Op, received: Tensors) -> Tensors | None:
        """``W``: the parameter gradients of a microbatch whose ``I`` ran, into ``.grad``."""
        weight = state.pending_w.pop((op.step.action.microbatch, op.step.action.chunk))
        with self._sync(op):
            weight.run()
        self._grads_ready(op)
        return None

    def _sync(self, op: _Op) -> AbstractContextManager[Any]:
        """``no_sync`` around every backward of a chunk but its last of the step."""
        if self.no_sync is None or op.final:
            return contextlib.nullcontext()
        return self.no_sync(op.step.action.chunk)

    def _grads_ready(self, op: _Op) -> None:
        if op.final and self.on_chunk_grads_ready is not None:
            self.on_chunk_grads_ready(op.step.action.chunk)

    @staticmethod
    def _input_grads(op: _Op, inputs: Tensors, grads: Sequence[torch.Tensor | None]) -> Tensors | None:
        """The input-gradient message to the previous stage (zeros where an input got no gradient)."""
        if op.first:
            return None
        grads = list(grads) or [None] * len(inputs)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))
