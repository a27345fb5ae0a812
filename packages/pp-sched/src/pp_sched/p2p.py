"""Point-to-point messages between adjacent pipeline stages over the pipeline group.

A message (:class:`~pp_sched.plan.Message`, the plan's own) carries a tuple of tensors of any shapes and
dtypes. Activations travel forward (stage ``s`` to ``s + 1``), gradients backward (``s + 1`` to ``s``);
the message names the pipeline ranks at both ends, as the schedule's placement puts the stages (looped:
the last rank's chunk ``c`` feeds rank 0's chunk ``c + 1``; V: the turn stays on one rank and is never
sent). The shapes of a boundary
are sent once, with its first activation message (or declared up front); a gradient message carries
one tensor for each floating-point tensor of the activation message it answers, with the same spec.

Every message has its own tag, but NCCL ignores tags and matches a pair's messages in posting order, so
the order is what makes them match: receives of one :meth:`StageP2P.exchange` are posted in the order
given (a boundary's shape message right before its first activation), and the executor posts them in
the sender's order (:mod:`pp_sched.plan`). Sends and receives of one :meth:`StageP2P.exchange`
go out as one ``batch_isend_irecv`` (through ``pstate.comm``: recorded, and simulated in dry runs). Sends
are never waited for until :meth:`StageP2P.wait_sends` when the backend returns one request per operation
(gloo), so a rank only ever waits for data it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pstate import Group, as_group, comm
from pstate.device import device_for_backend

from .errors import PipelineScheduleError
from .plan import BACKWARD, FORWARD, Message

#: Most tensors in one message and most dimensions of one tensor when shapes are exchanged.
MAX_TENSORS = 8
MAX_DIMS = 8
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_FIELDS = 2 + MAX_DIMS  # dtype code, ndim, dims
_META_LEN = 1 + MAX_TENSORS * _FIELDS


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one tensor of a message."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def has_grad(self) -> bool:
        """Whether a gradient travels back for this tensor (floating point tensors)."""
        return self.dtype.is_floating_point


def _encode(specs: Sequence[TensorSpec], device: torch.device) -> torch.Tensor:
    if not 1 <= len(specs) <= MAX_TENSORS:
        raise PipelineScheduleError(f"a stage sends {len(specs)} tensors; between 1 and {MAX_TENSORS} are supported")
    meta = [len(specs)]
    for i, spec in enumerate(specs):
        if spec.dtype not in _DTYPES:
            raise PipelineScheduleError(f"tensor {i} of a stage output has dtype {spec.dtype}, which p2p cannot send")
        if len(spec.shape) > MAX_DIMS:
            raise PipelineScheduleError(f"tensor {i} of a stage output has {len(spec.shape)} dims; at most {MAX_DIMS}")
        meta += [_DTYPES.index(spec.dtype), len(spec.shape), *spec.shape, *[0] * (MAX_DIMS - len(spec.shape))]
    meta += [0] * (_META_LEN - len(meta))
    return torch.tensor(meta, dtype=torch.int64, device=device)


def _decode(meta: torch.Tensor) -> tuple[TensorSpec, ...]:
    values = meta.tolist()
    specs = []
    for i in range(values[0]):
        code, ndim, *dims = values[1 + i * _FIELDS : 1 + (i + 1) * _FIELDS]
        specs.append(TensorSpec(tuple(dims[:ndim]), _DTYPES[code]))
    return tuple(specs)


class Pending:
    """Receives posted by :meth:`StageP2P.exchange`; :meth:`wait` returns their tensors."""

    def __init__(self, works: list[dist.Work], buffers: list[tuple[torch.Tensor, ...]]):
        self._works = works
        self._buffers = buffers

    def wait(self) -> list[tuple[torch.Tensor, ...]]:
        """Block until every receive is complete; one tuple of tensors per requested receive, in order."""
        for work in self._works:
            work.wait()
        self._works = []
        return self._buffers


class StageP2P:
    """Sends and receives stage-boundary messages (:class:`~pp_sched.plan.Message`) for one pipeline rank.

    ``group`` is the pipeline group (a ``pstate`` axis or a process group) of ``pp`` ranks; ``vpp`` is
    the number of chunks per rank. ``specs``, when given, declares the tensors of every activation
    message (same on every boundary) and skips the shape exchange. ``device`` holds received tensors
    (default: the device of the group's backend). A message names its boundary, microbatch and the
    pipeline ranks that send and receive it, so any stage placement (looped, V) is addressed alike.
    """

    def __init__(
        self,
        group: Group,
        *,
        pp: int,
        vpp: int = 1,
        specs: Sequence[TensorSpec] | None = None,
        device: torch.device | None = None,
    ):
        self.group = as_group(group)
        if dist.get_world_size(self.group) != pp:
            raise PipelineScheduleError(f"the pipeline group has {dist.get_world_size(self.group)} ranks but pp={pp}")
        self.pp, self.vpp, self.num_stages = pp, vpp, pp * vpp
        self.rank = dist.get_rank(self.group)
        self.device = device_for_backend(dist.get_backend(self.group)) if device is None else torch.device(device)
        self._peers = [dist.get_global_rank(self.group, r) for r in range(pp)]
        self._declared = None if specs is None else tuple(specs)
        self._specs: dict[int, tuple[TensorSpec, ...]] = {}  # boundary -> specs of its activation message
        self._sending: list[tuple[dist.Work, object]] = []  # a send request and the tensors it reads
        self._prune_at = 64
        #: Under ``pstate.comm.simulate`` (dry runs), the tensors a shape message would have announced.
        self.simulated_specs: tuple[TensorSpec, ...] | None = None

    # -- addressing: boundary b joins stage b and stage b + 1 --

    def _address(self, message: Message, sending: bool) -> int:
        """The global rank of ``message``'s other end, after checking it is this rank's to send or receive."""
        if message.kind not in (FORWARD, BACKWARD):
            raise PipelineScheduleError(f"message kind={message.kind!r} is not {FORWARD!r} or {BACKWARD!r}")
        if not 0 <= message.boundary < self.num_stages - 1:
            raise PipelineScheduleError(
                f"boundary {message.boundary} is outside 0..{self.num_stages - 2} ({self.num_stages} stages)"
            )
        mine, other = (message.src, message.dst) if sending else (message.dst, message.src)
        if mine != self.rank:
            role = "sender" if sending else "receiver"
            raise PipelineScheduleError(f"{message} names rank {mine} as its {role}, not pipeline rank {self.rank}")
        if not 0 <= other < self.pp or other == self.rank:
            raise PipelineScheduleError(f"{message} has no other pipeline rank to exchange with (pp={self.pp})")
        return self._peers[other]

    def _tag(self, direction: str, boundary: int, microbatch: int, index: int) -> int:
        slot = (microbatch * self.num_stages + boundary) * 2 + (direction == BACKWARD)
        return self.num_stages + slot * MAX_TENSORS + index

    def _message_specs(self, direction: str, boundary: int) -> tuple[TensorSpec, ...] | None:
        specs = self._specs.get(boundary, self._declared)
        if specs is not None and direction == BACKWARD:
            return tuple(s for s in specs if s.has_grad)
        return specs

    def _check(self, message: Message, peer: int, tensors: Sequence[torch.Tensor]) -> list[dist.P2POp]:
        """Check an outgoing message against its boundary's specs; the shape message when it is the first."""
        direction, boundary = message.kind, message.boundary
        got = tuple(TensorSpec.of(t) for t in tensors)
        expected = self._message_specs(direction, boundary)
        if expected is None and direction == BACKWARD:
            raise PipelineScheduleError(f"gradient sent over boundary {boundary}->{boundary + 1} before its activation")
        if expected is None:  # first activation over this boundary: its shapes go first
            meta = _encode(got, self.device)
            self._specs[boundary] = got
            return [dist.P2POp(dist.isend, meta, peer, self.group, tag=boundary)]
        if got != expected:
            raise PipelineScheduleError(
                f"{direction} message over stage boundary {boundary}->{boundary + 1} has tensors {got}, "
                f"but this boundary carries {expected} (shapes are fixed per boundary)"
            )
        return []

    def knows_shapes(self, message: Message) -> bool:
        """Whether the receive of ``message`` can be posted without waiting for a shape message."""
        return self._message_specs(message.kind, message.boundary) is not None

    # -- the exchange --

    def exchange(
        self,
        sends: Sequence[tuple[Message, Sequence[torch.Tensor]]] = (),
        recvs: Sequence[Message] = (),
    ) -> Pending:
        """Post ``sends`` (each a message this rank sends and its tensors) and the receives of ``recvs``
        (messages this rank receives) as one batch, and return the pending receives. ``"forward"``
        messages carry activations to the later stage, ``"backward"`` ones gradients to the earlier stage.
        The first receive over a boundary waits for its shapes here."""
        ops: list[dist.P2POp] = []
        for message, tensors in sends:
            peer = self._address(message, sending=True)
            tensors = tuple(t.detach().contiguous() for t in tensors)
            ops += self._check(message, peer, tensors)
            for i, tensor in enumerate(tensors):
                tag = self._tag(message.kind, message.boundary, message.microbatch, i)
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, tag))
        num_sends = len(ops)
        buffers: list[tuple[torch.Tensor, ...]] = []
        recv_works: list[dist.Work] = []
        for message in recvs:
            peer = self._address(message, sending=False)
            direction, boundary = message.kind, message.boundary
            specs = self._message_specs(direction, boundary)
            if specs is None and direction == BACKWARD:
                raise PipelineScheduleError(
                    f"gradient over stage boundary {boundary}->{boundary + 1} expected before any activation was sent"
                )
            if specs is None:  # the boundary's shapes come first: post what is gathered, wait for them
                meta = torch.empty(_META_LEN, dtype=torch.int64, device=self.device)
                ops.append(dist.P2POp(dist.irecv, meta, peer, self.group, boundary))
                works = comm.batch_isend_irecv(ops)
                works = self._keep_sends(works, ops[:num_sends], len(ops))
                works[-1].wait()  # the shape message (on NCCL, the one coalesced request)
                recv_works += works[:-1]
                ops, num_sends = [], 0
                decoded = _decode(meta)
                if not decoded and self.simulated_specs is not None and comm.simulating():
                    decoded = self.simulated_specs  # a simulated receive holds zeros: no shapes in it
                self._specs[boundary] = decoded
                specs = self._message_specs(direction, boundary)
            tensors = tuple(torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs)
            for i, tensor in enumerate(tensors):
                tag = self._tag(direction, boundary, message.microbatch, i)
                ops.append(dist.P2POp(dist.irecv, tensor, peer, self.group, tag))
            buffers.append(tensors)
        if ops:
            works = comm.batch_isend_irecv(ops)
            recv_works += self._keep_sends(works, ops[:num_sends], len(ops))
        return Pending(recv_works, buffers)

    def _keep_sends(self, works: list[dist.Work], sends: list[dist.P2POp], num_ops: int) -> list[dist.Work]:
        """Remember send requests with their tensors (waited for later) and return the receive requests to
        wait for now. A backend that coalesces the batch into fewer requests (NCCL) has all of them waited for."""
        if len(self._sending) >= self._prune_at:  # amortized: a step's cost stays linear in its messages
            self._sending = [(w, t) for w, t in self._sending if not w.is_completed()]
            self._prune_at = max(64, 2 * len(self._sending))
        if len(works) != num_ops:
            self._sending += [(w, tuple(op.tensor for op in sends)) for w in works]
            return list(works)
        self._sending += [(w, op.tensor) for w, op in zip(works, sends)]
        return list(works[len(sends) :])

    def wait_sends(self) -> None:
        """Block until every posted send is complete (call before reusing or dropping sent tensors)."""
        for work, _ in self._sending:
            work.wait()
        self._sending = []
