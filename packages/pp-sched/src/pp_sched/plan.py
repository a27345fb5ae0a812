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
    """One message over stage boundary ``boundary`` (between stages ``boundary`` and ``boundary + 1``),
    from pipeline rank ``src`` to pipeline rank ``dst``.

    ``kind`` is ``"forward"`` (an activation, to the later stage), ``"backward"`` (a gradient, to the
    earlier stage) or ``"shape"`` (the shapes of a boundary, sent before its first activation). A message
    with ``src == dst`` (the turn of a V placement) stays on its rank and is never posted.
    """

    kind: str
    boundary: int
    microbatch: int
    src: int
    dst: int

    @property
    def local(self) -> bool:
        """Whether sender and receiver are the same rank (handed over without communication)."""
        return self.src == self.dst


def message(schedule: Schedule, kind: str, boundary: int, microbatch: int = 0) -> Message:
    """The :class:`Message` ``kind`` over ``boundary`` of ``schedule``, addressed by its placement."""
    later, earlier = schedule.rank_of(boundary + 1), schedule.rank_of(boundary)
    src, dst = (later, earlier) if kind == BACKWARD else (earlier, later)
    return Message(kind, boundary, microbatch, src, dst)


@dataclass(frozen=True)
class Step:
    """One action of a rank and its messages: ``recvs`` are posted (in order) before the action runs,
    ``needs`` is the message it waits for (posted, or local), ``sends`` are posted after it ran, and
    ``out`` is the data message it produces (the last of ``sends``, or a local one, or ``None``)."""

    action: Action
    recvs: tuple[Message, ...]
    needs: Message | None
    sends: tuple[Message, ...]
    out: Message | None = None


def received(schedule: Schedule, rank: int, action: Action, train: bool = True) -> Message | None:
    """The message ``action`` waits for: an activation for ``F`` after stage 0, a gradient for ``B``/``I``
    before the last stage (training only)."""
    stage = schedule.stage_of(rank, action.chunk)
    if action.kind == "F" and stage > 0:
        return message(schedule, FORWARD, stage - 1, action.microbatch)
    if train and action.kind in "BI" and stage < schedule.num_stages - 1:
        return message(schedule, BACKWARD, stage, action.microbatch)
    return None


def sent(schedule: Schedule, rank: int, action: Action, train: bool = True) -> Message | None:
    """The message ``action`` sends: its output for ``F`` before the last stage, the input gradient for
    ``B``/``I`` after stage 0 (training only)."""
    stage = schedule.stage_of(rank, action.chunk)
    if action.kind == "F" and stage < schedule.num_stages - 1:
        return message(schedule, FORWARD, stage, action.microbatch)
    if train and action.kind in "BI" and stage > 0:
        return message(schedule, BACKWARD, stage - 1, action.microbatch)
    return None


def _actions(schedule: Schedule, rank: int, train: bool) -> tuple[Action, ...]:
    return tuple(a for a in schedule.actions[rank] if train or a.kind == "F")


def _sends(schedule: Schedule, rank: int, train: bool, declared: bool) -> list[tuple[Message, ...]]:
    """Per action of ``rank``, what it posts: a shape message precedes a boundary's first activation; a
    local message is not posted."""
    announced: set[int] = set()
    out = []
    for action in _actions(schedule, rank, train):
        data = sent(schedule, rank, action, train)
        group: tuple[Message, ...] = () if data is None or data.local else (data,)
        if group and data.kind == FORWARD and not declared and data.boundary not in announced:
            announced.add(data.boundary)
            group = (message(schedule, SHAPE, data.boundary), data)
        out.append(group)
    return out


def _needs_driven(
    schedule: Schedule, rank: int, train: bool, sends: list[list[tuple[Message, ...]]]
) -> list[list[Message]]:
    """Per action of ``rank``, the receives posted before it: from the sender of what it needs, every
    message up to that one in the sender's order (``sends``: every rank's :func:`_sends`)."""
    pp = schedule.pp
    channels: dict[int, list[Message]] = {}  # sender -> what it sends to this rank, in its order
    for src in range(pp):
        channels[src] = [m for group in sends[src] for m in group if m.dst == rank]
    position = {m: i for channel in channels.values() for i, m in enumerate(channel)}
    taken = dict.fromkeys(range(pp), 0)
    posted: set[Message] = set()
    out = []
    for action in _actions(schedule, rank, train):
        need = received(schedule, rank, action, train)
        recvs: list[Message] = []
        if need is not None and not need.local and need not in posted:
            src = need.src
            if position.get(need, -1) < taken[src]:
                raise PipelineScheduleError(f"rank {rank} {action} needs {need}, which rank {src} never sends")
            while need not in posted:
                earlier = channels[src][taken[src]]
                taken[src] += 1
                posted.add(earlier)
                recvs.append(earlier)
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
    recvs = [_needs_driven(schedule, r, train, sends) for r in range(pp)]
    needs = [[received(schedule, r, a, train) for a in actions[r]] for r in range(pp)]
    outs = [[sent(schedule, r, a, train) for a in actions[r]] for r in range(pp)]
    _Puller(pp, sends, recvs).run()
    return tuple(tuple(map(Step, actions[r], map(tuple, recvs[r]), needs[r], sends[r], outs[r])) for r in range(pp))


def posting_order(schedule: Schedule, rank: int, *, train: bool = True, declared: bool = False) -> tuple[Step, ...]:
    """``rank``'s steps from :func:`posting_orders`."""
    return posting_orders(schedule, train=train, declared=declared)[rank]


class _Puller:
    """Replays the posts under NCCL's semantics and, where they are stuck, pulls receives earlier.

    Where a stuck batch sends to a rank that posts the receive only later, that receive (and what the
    same sender sent before it) moves into the receiver's current batch: a stuck batch waits only for
    batches that have started, so this breaks every cycle of ranks sending to each other. The replay
    then continues from where it stopped: a pulled receive only moves into a batch that has not
    completed, and earlier posts only let more complete, so continuing reaches the same end as replaying
    from the start. Batches are edited in place (one left empty completes at once), so the whole costs
    one replay plus the moves.
    """

    def __init__(self, pp: int, sends: list[list[tuple[Message, ...]]], recvs: list[list[list[Message]]]):
        self.pp, self.recvs = pp, recvs
        self.posts = [batches(list(map(_Stub, sends[r], map(tuple, recvs[r])))) for r in range(pp)]
        self.where = _where(self.posts)
        # each receiver's channel from each sender, in the sender's order; receives follow it
        self.channel: dict[tuple[int, int], list[Message]] = {}
        self.position: dict[Message, int] = {}
        self.step_of: dict[Message, int] = {}
        for r in range(pp):
            for k, rv in enumerate(recvs[r]):
                for m in rv:
                    self.position[m] = len(self.channel.setdefault((m.src, r), []))
                    self.channel[(m.src, r)].append(m)
                    self.step_of[m] = k

    def run(self) -> None:
        current = [0] * self.pp
        while True:
            stuck = _advance(self.pp, self.posts, self.where, current)
            if stuck is None:
                return
            if not self._pull(stuck):
                raise PipelineScheduleError(_stuck_message(self.posts, stuck))

    def _pull(self, current: list[int]) -> bool:
        moved = False
        for sender in range(self.pp):
            if current[sender] >= len(self.posts[sender]):
                continue
            for op, m in list(self.posts[sender][current[sender]].ops):
                rank = m.dst
                later = (
                    op == "send" and current[rank] < len(self.posts[rank]) and self.where[("recv", m)] > current[rank]
                )
                if later:
                    moved |= self._move(rank, current[rank], m)
        return moved

    def _move(self, rank: int, batch: int, message: Message) -> bool:
        """Post ``message`` (and what its sender sent to ``rank`` before it) in ``rank``'s batch ``batch``'s step."""
        posts = self.posts[rank]
        step = posts[batch].step
        channel = self.channel[(message.src, rank)]
        first = self.position[message]
        if self.step_of[message] <= step:
            return False
        while first and self.step_of[channel[first - 1]] > step:
            first -= 1
        pulled = channel[first : self.position[message] + 1]
        if any(m.kind == SHAPE for m in pulled):  # a shape receive splits a batch: not moved in place
            return False
        target = batch  # the step's last batch (a shape receive of the step ends the ones before it)
        while target + 1 < len(posts) and posts[target + 1].step == step:
            target += 1
        for m in pulled:
            old = self.step_of[m]
            self.recvs[rank][old].remove(m)
            self.recvs[rank][step].append(m)
            self.step_of[m] = step
            posts[self.where[("recv", m)]].ops.remove(("recv", m))
            posts[target].ops.append(("recv", m))
            self.where[("recv", m)] = target
        return True


@dataclass(frozen=True)
class _Stub:
    """What :func:`batches` reads of a step."""

    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]


@dataclass
class _Batch:
    """One ``batch_isend_irecv``: its ``(op, message)`` pairs and the step whose receives it posts."""

    ops: list[tuple[str, Message]]
    step: int


def batches(steps: Sequence[Step | _Stub]) -> list[_Batch]:
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
            out = [m for step in plans[src] for m in step.sends if m.dst == dst]
            into = [m for step in plans[dst] for m in step.recvs if m.src == src]
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
            if step.needs is not None and not step.needs.local and step.needs not in seen:
                raise PipelineScheduleError(f"rank {rank} {step.action} waits for {step.needs} before posting it")
    posts = [batches(plan) for plan in plans]
    stuck = _advance(pp, posts, _where(posts), [0] * pp)
    if stuck is not None:
        raise PipelineScheduleError(_stuck_message(posts, stuck))


def _where(posts: list[list[_Batch]]) -> dict[tuple[str, Message], int]:
    """``(op, message)`` -> the index of the batch that posts it."""
    return {(op, m): i for rank_posts in posts for i, batch in enumerate(rank_posts) for op, m in batch.ops}


def _advance(
    pp: int, posts: list[list[_Batch]], where: dict[tuple[str, Message], int], current: list[int]
) -> list[int] | None:
    """Run every rank's batches in order from ``current`` (updated in place); a batch completes once each
    of its messages' other end is in a batch that has started. Returns ``None`` when all complete, else
    ``current``, each rank's stuck batch index. A rank is looked at again only when a peer advanced."""
    todo = set(range(pp))
    while todo:
        rank = todo.pop()
        rank_posts = posts[rank]
        while current[rank] < len(rank_posts):
            for op, message in rank_posts[current[rank]].ops:
                if op == "send":
                    peer, other = message.dst, "recv"
                else:
                    peer, other = message.src, "send"
                if current[peer] < where[(other, message)]:
                    break
            else:
                current[rank] += 1
                todo.update(m.dst if op == "send" else m.src for op, m in rank_posts[current[rank] - 1].ops)
                if current[rank] < len(rank_posts):
                    todo.update(m.dst if op == "send" else m.src for op, m in rank_posts[current[rank]].ops)
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
