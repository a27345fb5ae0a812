"""The order in which each rank posts its p2p messages, derived from the schedule alone, and its check.

NCCL ignores tags: between two ranks, the n-th message ``src`` sends to ``dst`` is matched with the n-th
receive ``dst`` posts from ``src``. With ``vpp > 1`` (or ``pp == 2``) activations and gradients of several
stage boundaries share a pair of ranks, and the order a receiver needs them in need not be the order
they are sent in. So the receiver posts receives in the *sender's* order: when an action needs a
message, the rank posts every not yet posted receive from that sender up to it, in the order the
sender sends them (earlier ones are pre-posted into buffers and waited for when their action comes).
:func:`posting_order` derives these :class:`Step` lists; :class:`~pp_sched.PipelineExecutor` posts
exactly them, and :func:`check_posting_order` proves, for a schedule, that every pair's sequences agree.

The check also replays the posts under NCCL's semantics (each rank's batches run one after another;
a send and its receive complete together once both are posted), which finds an order that would hang
there even though it matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .action import Action, Schedule
from .errors import PipelineScheduleError

FORWARD, BACKWARD, SHAPE = "forward", "backward", "shape"


@dataclass(frozen=True)
class Message:
    """One message over stage boundary ``boundary`` (between stages ``boundary`` and ``boundary + 1``).

    ``kind`` is ``"forward"`` (an activation, to the later stage), ``"backward"`` (a gradient, to the
    earlier stage) or ``"shape"`` (the shapes of a boundary, sent before its first activation).
    """

    kind: str
    boundary: int
    microbatch: int = 0

    def source(self, pp: int) -> int:
        """The pipeline rank that sends it."""
        return (self.boundary + (self.kind == BACKWARD)) % pp

    def destination(self, pp: int) -> int:
        """The pipeline rank that receives it."""
        return (self.boundary + (self.kind != BACKWARD)) % pp


@dataclass(frozen=True)
class Step:
    """One action of a rank and its messages: ``recvs`` are posted (in order) before the action runs,
    ``needs`` is the received message it waits for, ``sends`` are posted after it ran."""

    action: Action
    recvs: tuple[Message, ...]
    needs: Message | None
    sends: tuple[Message, ...]


def received(schedule: Schedule, rank: int, action: Action, train: bool = True) -> Message | None:
    """The message ``action`` waits for: an activation for ``F`` after stage 0, a gradient for ``B``/``I``
    before the last stage (training only)."""
    stage = schedule.stage_of(rank, action.chunk)
    if action.kind == "F" and stage > 0:
        return Message(FORWARD, stage - 1, action.microbatch)
    if train and action.kind in "BI" and stage < schedule.num_stages - 1:
        return Message(BACKWARD, stage, action.microbatch)
    return None


def sent(schedule: Schedule, rank: int, action: Action, train: bool = True) -> Message | None:
    """The message ``action`` sends: its output for ``F`` before the last stage, the input gradient for
    ``B``/``I`` after stage 0 (training only)."""
    stage = schedule.stage_of(rank, action.chunk)
    if action.kind == "F" and stage < schedule.num_stages - 1:
        return Message(FORWARD, stage, action.microbatch)
    if train and action.kind in "BI" and stage > 0:
        return Message(BACKWARD, stage - 1, action.microbatch)
    return None


def _actions(schedule: Schedule, rank: int, train: bool) -> tuple[Action, ...]:
    return tuple(a for a in schedule.actions[rank] if train or a.kind == "F")


def _sends(schedule: Schedule, rank: int, train: bool, declared: bool) -> list[tuple[Message, ...]]:
    """Per action of ``rank``, what it sends: a shape message precedes a boundary's first activation."""
    announced: set[int] = set()
    out = []
    for action in _actions(schedule, rank, train):
        message = sent(schedule, rank, action, train)
        group: tuple[Message, ...] = () if message is None else (message,)
        if message is not None and message.kind == FORWARD and not declared and message.boundary not in announced:
            announced.add(message.boundary)
            group = (Message(SHAPE, message.boundary), message)
        out.append(group)
    return out


def _needs_driven(schedule: Schedule, rank: int, train: bool, declared: bool) -> list[list[Message]]:
    """Per action of ``rank``, the receives posted before it: from the sender of what it needs, every
    message up to that one in the sender's order."""
    pp = schedule.pp
    channels: dict[int, list[Message]] = {}  # sender -> what it sends to this rank, in its order
    for src in range(pp):
        sends = [m for group in _sends(schedule, src, train, declared) for m in group]
        channels[src] = [m for m in sends if m.destination(pp) == rank]
    taken = dict.fromkeys(range(pp), 0)
    posted: set[Message] = set()
    out = []
    for action in _actions(schedule, rank, train):
        need = received(schedule, rank, action, train)
        recvs: list[Message] = []
        if need is not None and need not in posted:
            src = need.source(pp)
            if need not in channels[src][taken[src] :]:
                raise PipelineScheduleError(f"rank {rank} {action} needs {need}, which rank {src} never sends")
            while need not in posted:
                message = channels[src][taken[src]]
                taken[src] += 1
                posted.add(message)
                recvs.append(message)
        out.append(recvs)
    return out


def posting_orders(schedule: Schedule, *, train: bool = True, declared: bool = False) -> tuple[tuple[Step, ...], ...]:
    """Every rank's steps: its actions (only the ``F`` when not ``train``) with the messages it posts
    around each, receives in their senders' order. ``declared``: shapes are declared, so no shape messages.

    Receives are posted when needed, except where two ranks would each send to the other in batches
    without the matching receive (NCCL would hang): then the receive moves into the batch of the send,
    as Megatron's ``send_backward_recv_backward`` does. Raises :class:`PipelineScheduleError` if the
    posts cannot be made to complete.
    """
    pp = schedule.pp
    actions = [_actions(schedule, r, train) for r in range(pp)]
    sends = [_sends(schedule, r, train, declared) for r in range(pp)]
    recvs = [_needs_driven(schedule, r, train, declared) for r in range(pp)]

    def steps() -> tuple[tuple[Step, ...], ...]:
        return tuple(
            tuple(
                Step(a, tuple(rv), received(schedule, r, a, train), sd)
                for a, rv, sd in zip(actions[r], recvs[r], sends[r])
            )
            for r in range(pp)
        )

    while True:
        plans = steps()
        posts = [batches(plan) for plan in plans]
        stuck = _replay(pp, posts)
        if stuck is None:
            return plans
        if not _pull_receives(pp, posts, stuck, recvs):
            raise PipelineScheduleError(_stuck_message(posts, stuck))


def posting_order(schedule: Schedule, rank: int, *, train: bool = True, declared: bool = False) -> tuple[Step, ...]:
    """``rank``'s steps from :func:`posting_orders`."""
    return posting_orders(schedule, train=train, declared=declared)[rank]


def _pull_receives(pp: int, posts: list[list[_Batch]], current: list[int], recvs: list[list[list[Message]]]) -> bool:
    """Where a stuck batch sends to a rank that posts the receive only later, move that receive into
    the receiver's current batch (a stuck batch waits only for batches that have started: this breaks
    every cycle of ranks sending to each other). Returns whether anything moved."""
    where = _where(posts)
    moved = False
    for sender in range(pp):
        if current[sender] >= len(posts[sender]):
            continue
        for op, message in posts[sender][current[sender]].ops:
            rank = message.destination(pp)
            if op == "send" and current[rank] < len(posts[rank]) and where[("recv", message)] > current[rank]:
                moved |= _move(recvs[rank], posts[rank][current[rank]].step, message, sender, pp)
    return moved


def _move(recvs: list[list[Message]], step: int, message: Message, src: int, pp: int) -> bool:
    """Post ``message`` (and what ``src`` sent before it) at ``step`` instead of later."""
    if step >= len(recvs):
        return False
    later = [m for rv in recvs[step + 1 :] for m in rv if m.source(pp) == src]
    if message not in later:
        return False
    pulled = later[: later.index(message) + 1]
    for rv in recvs[step + 1 :]:
        rv[:] = [m for m in rv if m not in pulled]
    recvs[step] += pulled
    return True


@dataclass
class _Batch:
    """One ``batch_isend_irecv``: its ``(op, message)`` pairs and the step whose receives it posts."""

    ops: list[tuple[str, Message]]
    step: int


def batches(steps: Sequence[Step]) -> list[_Batch]:
    """The batches a rank posts, as the executor posts them: the receives of step 0, then after each
    action its sends with the next step's receives; a batch ends after a shape receive (the rank waits
    for the shapes before it can post the data receive)."""
    out = [_Batch([], 0)]
    for k, step in enumerate(steps):
        if k:
            out.append(_Batch([("send", m) for m in steps[k - 1].sends], k))
        for message in step.recvs:
            out[-1].ops.append(("recv", message))
            if message.kind == SHAPE:
                out.append(_Batch([], k))
    if steps:
        out.append(_Batch([("send", m) for m in steps[-1].sends], len(steps)))
    return [batch for batch in out if batch.ops]


def check_posting_order(
    schedule: Schedule, plans: Sequence[Sequence[Step]] | None = None, *, train: bool = True, declared: bool = False
) -> None:
    """Check that for every pair of ranks the messages one posts to the other are the receives the
    other posts from it, in the same order, and that the posts complete under NCCL's semantics.

    ``plans`` defaults to :func:`posting_orders`. Raises :class:`PipelineScheduleError` naming the pair
    and the first message that differs, or the batches that would wait forever.
    """
    pp = schedule.pp
    if plans is None:
        plans = posting_orders(schedule, train=train, declared=declared)
    for src in range(pp):
        for dst in range(pp):
            out = [m for step in plans[src] for m in step.sends if m.destination(pp) == dst]
            into = [m for step in plans[dst] for m in step.recvs if m.source(pp) == src]
            if out != into:
                i = next((i for i, (a, b) in enumerate(zip(out, into)) if a != b), min(len(out), len(into)))
                mine = out[i] if i < len(out) else "nothing"
                theirs = into[i] if i < len(into) else "nothing"
                raise PipelineScheduleError(
                    f"rank {src} -> rank {dst}: message {i} is {mine} on the sender but {theirs} on the receiver"
                )
    for rank, plan in enumerate(plans):
        seen: set[Message] = set()
        for step in plan:
            seen.update(step.recvs)
            if step.needs is not None and step.needs not in seen:
                raise PipelineScheduleError(f"rank {rank} {step.action} waits for {step.needs} before posting it")
    posts = [batches(plan) for plan in plans]
    stuck = _replay(pp, posts)
    if stuck is not None:
        raise PipelineScheduleError(_stuck_message(posts, stuck))


def _where(posts: list[list[_Batch]]) -> dict[tuple[str, Message], int]:
    """``(op, message)`` -> the index of the batch that posts it."""
    return {(op, m): i for rank_posts in posts for i, batch in enumerate(rank_posts) for op, m in batch.ops}


def _replay(pp: int, posts: list[list[_Batch]]) -> list[int] | None:
    """Run every rank's batches in order; a batch completes once each of its messages' other end is in
    a batch that has started. Returns ``None`` when all complete, else each rank's stuck batch index."""
    where = _where(posts)
    current = [0] * pp
    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            while current[rank] < len(posts[rank]):
                for op, message in posts[rank][current[rank]].ops:
                    other = "recv" if op == "send" else "send"
                    peer = message.destination(pp) if op == "send" else message.source(pp)
                    if current[peer] < where[(other, message)]:
                        break
                else:
                    current[rank] += 1
                    progress = True
                    continue
                break
    return None if all(current[r] == len(posts[r]) for r in range(pp)) else current


def _stuck_message(posts: list[list[_Batch]], current: list[int]) -> str:
    lines = [
        f"  rank {r} batch {current[r]}: {posts[r][current[r]].ops}"
        for r in range(len(posts))
        if current[r] < len(posts[r])
    ]
    return "the posts would wait forever under NCCL's semantics:\n" + "\n".join(lines)
