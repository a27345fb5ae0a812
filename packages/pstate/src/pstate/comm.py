"""Communication accounting: the collectives the packages call, through one thin recording layer.

Every function here calls the ``torch.distributed`` function of the same meaning; when a
:class:`CommRecorder` is active it also appends a :class:`CommRecord` (operation, axis name, dtype,
payload bytes, group size, seconds). With no recorder active the cost is one list check per call.

Bytes. ``bytes`` is the payload: the size of the tensor the operation reduces or produces on this rank
(all-reduce and broadcast: the tensor; reduce-scatter: the full input; all-gather: the full output;
all-to-all, send and recv: the tensor sent or received). :attr:`CommRecord.wire_bytes` converts it to
what a ring algorithm moves per rank (the bus-bandwidth factors of nccl-tests: ``2(n-1)/n`` for
all-reduce, ``(n-1)/n`` for reduce-scatter, all-gather and all-to-all, ``1`` for broadcast and p2p), so
DDP's all-reduce and ZeRO's reduce-scatter plus all-gather compare on one scale.

Axis names. A record names the axis a collective ran over: the name a recorder built with
:meth:`CommRecorder.for_state` gives the group (the first of ``tp, cp, ep, etp, dp, pp, ...`` whose
group it is, so ``dp_cp`` at ``cp=1`` counts as ``dp``), else the :class:`~pstate.Axis`'s own name,
else ``"world"`` or ``"group"``.

Seconds. A synchronous call is timed around the call; an asynchronous one from its launch to the end of
its ``wait()`` (the work object returned is a thin wrapper that does the timing).

The active recorder is process-wide (a recorder is a context manager that installs itself there)
rather than a context variable, so that collectives issued from autograd hooks, which run on the
autograd engine's device threads under CUDA, are recorded too.

Simulation. Under :func:`simulate` (:mod:`pstate.simulated`) no call reaches ``torch.distributed``: each
fills its output from this rank's input and is recorded as it would be, with zero seconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from . import simulated
from .collectives import all_gather_single, reduce_scatter_in_place, reduce_scatter_single
from .simulated import DoneWork, Simulation, simulate, simulating
from .state import Axis, Group, ParallelState, as_group

PREFERRED_NAMES = (
    "tp",
    "cp",
    "ep",
    "etp",
    "dp",
    "pp",
    "edp",
    "dp_cp",
    "tp_cp",
    "tp_dp",
    "tp_dp_cp",
    "mp",
    "cp_a2a",
    "cp_ring",
    "dp_shard",
    "dp_replicate",
)
"""The order in which a group that several axes share is named (the first that matches)."""

_FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: 1.0, "send": lambda n: 1.0}


@dataclass
class CommRecord:
    """One collective or p2p call: ``op``, ``axis``, ``dtype``, payload ``bytes``, group ``size`` and
    ``seconds`` (filled once an asynchronous call's ``wait()`` returns)."""

    op: str
    axis: str
    dtype: torch.dtype
    bytes: int
    size: int
    seconds: float = 0.0

    @property
    def wire_bytes(self) -> float:
        """Bytes a ring algorithm moves per rank for this call (nccl-tests' bus-bandwidth factor)."""
        if self.op in ("send", "recv"):
            return float(self.bytes)
        factor = _FACTORS.get(self.op, lambda n: (n - 1) / n)
        return self.bytes * factor(self.size) if self.size > 1 else 0.0


class CommRecorder:
    """Collects :class:`CommRecord` s while active (``with recorder: ...``; nesting restores the outer one).

    ``names`` maps process groups to axis names (see :meth:`for_state`)."""

    _active: ClassVar[list[CommRecorder]] = []  # the process-wide stack of active recorders; see the module notes

    def __init__(self, names: Mapping[dist.ProcessGroup, str] | None = None) -> None:
        self.records: list[CommRecord] = []
        self._names = {id(g): n for g, n in (names or {}).items()}
        self._groups = list((names or {}).keys())  # keeps the ids valid

    @classmethod
    def for_state(cls, ps: ParallelState) -> CommRecorder:
        """A recorder that names each group of ``ps`` by its preferred axis name (see the module)."""
        names: dict[dist.ProcessGroup, str] = {}
        for name in (*PREFERRED_NAMES, "embedding", "world"):
            axis = getattr(ps, name, None)
            if isinstance(axis, Axis) and not any(g is axis.group for g in names):
                names[axis.group] = name
        return cls(names)

    def __enter__(self) -> CommRecorder:
        CommRecorder._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        CommRecorder._active.remove(self)

    def clear(self) -> None:
        """Forget the records so far (for example at the start of each step)."""
        self.records.clear()

    def name_of(self, group: Group | None) -> str:
        """The axis name recorded for ``group``."""
        if group is None:
            return self._names.get(id(dist.group.WORLD), "world")
        pg = as_group(group)
        if id(pg) in self._names:
            return self._names[id(pg)]
        if isinstance(group, Axis):
            return group.name
        return "world" if pg is dist.group.WORLD else "group"

    def by_axis(self, ops: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Totals per axis: ``bytes``, ``wire_bytes``, ``seconds`` and ``calls`` (only ``ops``, if given)."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            if ops is not None and r.op not in ops:
                continue
            total = out.setdefault(r.axis, {"bytes": 0, "wire_bytes": 0.0, "seconds": 0.0, "calls": 0})
            total["bytes"] += r.bytes
            total["wire_bytes"] += r.wire_bytes
            total["seconds"] += r.seconds
            total["calls"] += 1
        return out

    def by_op(self, axis: str | None = None) -> dict[str, dict[str, float]]:
        """Totals per operation (on ``axis`` only, if given): ``bytes``, ``calls``, ``seconds``."""
        out: dict[str, dict[str, float]] = {}
        for r in self.records:
            if axis is not None and r.axis != axis:
                continue
            total = out.setdefault(r.op, {"bytes": 0, "seconds": 0.0, "calls": 0})
            total["bytes"] += r.bytes
            total["seconds"] += r.seconds
            total["calls"] += 1
        return out


def recording() -> bool:
    """Whether a recorder is active (callers may skip building anything only a record needs)."""
    return bool(CommRecorder._active)


class _TimedWork:
    """An asynchronous call's work object that fills its record's seconds when ``wait()`` returns."""

    def __init__(self, work: Any, record: CommRecord, began: float) -> None:
        self._work, self._record, self._began = work, record, began

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        result = self._work.wait(*args, **kwargs)
        if not self._record.seconds:
            self._record.seconds = time.perf_counter() - self._began
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _call(
    kind: str,
    group: Group | None,
    dtype: torch.dtype,
    nbytes: int,
    fn: Any,
    fill: Any,
    async_op: bool,
    /,
    *args: Any,
    **kw: Any,
) -> Any:
    """Call ``fn(*args, **kw)`` (recorded when a recorder is active), or under :func:`pstate.simulated.simulate`
    ``fill()`` instead (``None``: nothing to fill)."""
    if not CommRecorder._active and not Simulation.active:
        return fn(*args, **kw)
    if CommRecorder._active:
        recorder = CommRecorder._active[-1]
        pg = None if group is None else as_group(group)
        size = dist.get_world_size(pg)
        record = CommRecord(kind, recorder.name_of(group), dtype, nbytes, size)
        recorder.records.append(record)
    if Simulation.active:
        if fill is not None:
            fill()
        return DoneWork() if async_op else None
    began = time.perf_counter()
    work = fn(*args, **kw)
    if async_op and work is not None:
        return _TimedWork(work, record, began)
    record.seconds = time.perf_counter() - began
    return work


def all_reduce(
    tensor: torch.Tensor, *, group: Group | None = None, op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False
) -> Any:
    """``dist.all_reduce`` over ``group`` (an :class:`~pstate.Axis` or a process group), recorded."""
    pg = None if group is None else as_group(group)
    return _call(
        "all_reduce",
        group,
        tensor.dtype,
        _nbytes(tensor),
        dist.all_reduce,
        None,
        async_op,
        tensor,
        op=op,
        group=pg,
        async_op=async_op,
    )


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: Group | None = None,
    async_op: bool = False,
    scratch_input: bool = False,
) -> Any:
    """Sum ``input`` over ``group`` and keep this rank's equal piece in ``output``, recorded.

    ``scratch_input``: the caller no longer needs ``input`` (a temporary of its own), which may then be
    overwritten. On gloo, whose reduce-scatter copies its whole input and all-reduces the copy, the sum
    then runs in place in ``input`` and this rank's piece is copied out: one full copy fewer. Recorded as
    the reduce-scatter it is; other backends ignore the flag."""
    pg = None if group is None else as_group(group)
    fn, fill = reduce_scatter_single, lambda: simulated.fill_reduce_scatter(output, input, pg)
    if scratch_input and not Simulation.active and input.is_contiguous() and dist.get_backend(pg) == "gloo":
        fn = reduce_scatter_in_place
    return _call(
        "reduce_scatter", group, input.dtype, _nbytes(input), fn, fill, async_op,
        output, input, group=pg, async_op=async_op,
    )  # fmt: skip


def all_gather(output: torch.Tensor, input: torch.Tensor, *, group: Group | None = None, async_op: bool = False) -> Any:
    """Concatenate every rank's ``input`` into ``output`` (in group-rank order), recorded."""
    pg = None if group is None else as_group(group)
    return _call(
        "all_gather",
        group,
        output.dtype,
        _nbytes(output),
        all_gather_single,
        lambda: simulated.fill_all_gather(output, input, pg),
        async_op,
        output,
        input,
        group=pg,
        async_op=async_op,
    )


def broadcast(tensor: torch.Tensor, src: int, *, group: Group | None = None, async_op: bool = False) -> Any:
    """``dist.broadcast`` of global rank ``src``'s ``tensor`` over ``group``, recorded."""
    pg = None if group is None else as_group(group)
    return _call(
        "broadcast",
        group,
        tensor.dtype,
        _nbytes(tensor),
        dist.broadcast,
        None,
        async_op,
        tensor,
        src,
        group=pg,
        async_op=async_op,
    )


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    *,
    group: Group | None = None,
    async_op: bool = False,
) -> Any:
    """``dist.all_to_all_single``, recorded (bytes: ``input``)."""
    pg = None if group is None else as_group(group)
    return _call(
        "all_to_all", group, input.dtype, _nbytes(input), dist.all_to_all_single,
        lambda: simulated.fill_all_to_all(output, input, output_split_sizes, input_split_sizes, pg), async_op,
        output, input, output_split_sizes, input_split_sizes, group=pg, async_op=async_op,
    )  # fmt: skip


def all_gather_list(
    tensors: list[torch.Tensor], input: torch.Tensor, *, group: Group | None = None, async_op: bool = False
) -> Any:
    """``dist.all_gather`` into a list of tensors, recorded (bytes: all of ``tensors``)."""
    pg = None if group is None else as_group(group)
    nbytes = _nbytes(input) * len(tensors)

    fn, fill = dist.all_gather, lambda: simulated.fill_list(tensors, input)
    return _call(
        "all_gather", group, input.dtype, nbytes, fn, fill, async_op, tensors, input, group=pg, async_op=async_op
    )


def batch_isend_irecv(ops: list[dist.P2POp]) -> list[Any]:
    """``dist.batch_isend_irecv``, each op recorded as a ``send`` or ``recv`` on its group."""
    if not CommRecorder._active and not Simulation.active:
        return dist.batch_isend_irecv(ops)
    records = []
    if CommRecorder._active:
        recorder = CommRecorder._active[-1]
        for op in ops:
            kind = "send" if op.op in (dist.isend, dist.send) else "recv"
            size = dist.get_world_size(op.group)
            nbytes = op.tensor.numel() * op.tensor.element_size()
            records.append(CommRecord(kind, recorder.name_of(op.group), op.tensor.dtype, nbytes, size))
        recorder.records.extend(records)
    if Simulation.active:
        for op in ops:
            if op.op not in (dist.isend, dist.send):
                simulated.fill_recv(op.tensor)
        return [DoneWork() for _ in ops]
    began = time.perf_counter()
    works = dist.batch_isend_irecv(ops)
    if len(works) == len(records):
        return [_TimedWork(w, r, began) for w, r in zip(works, records)]
    return [_TimedWork(w, records[0], began) for w in works]


def send(tensor: torch.Tensor, dst: int, *, group: Group | None = None) -> None:
    """``dist.send`` to global rank ``dst``, recorded."""
    pg = None if group is None else as_group(group)
    _call("send", group, tensor.dtype, _nbytes(tensor), dist.send, None, False, tensor, dst, group=pg)


def recv(tensor: torch.Tensor, src: int, *, group: Group | None = None) -> None:
    """``dist.recv`` from global rank ``src``, recorded."""
    pg = None if group is None else as_group(group)
    fill = lambda: simulated.fill_recv(tensor)  # noqa: E731
    _call("recv", group, tensor.dtype, _nbytes(tensor), dist.recv, fill, False, tensor, src, group=pg)


__all__ = [
    "PREFERRED_NAMES",
    "CommRecord",
    "CommRecorder",
    "all_gather",
    "all_gather_list",
    "all_reduce",
    "all_to_all_single",
    "batch_isend_irecv",
    "broadcast",
    "recording",
    "recv",
    "reduce_scatter",
    "send",
    "simulate",
    "simulating",
]
