"""The data a schedule is made of: ``Action`` (one step on one rank) and ``Schedule`` (every rank's steps)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import PipelineScheduleError

#: Action kinds: forward, full backward, input-gradient backward, weight-gradient backward.
KINDS = ("F", "B", "I", "W")
#: Stage layouts: ``looped`` (chunk ``c`` of rank ``r`` holds stage ``c * pp + r``) and ``v`` (two chunks:
#: chunk 0 of rank ``r`` holds stage ``r``, chunk 1 holds stage ``2 * pp - 1 - r``).
LAYOUTS = ("looped", "v")


@dataclass(frozen=True)
class Action:
    """One step of one rank: run ``kind`` for ``microbatch`` on the rank's model chunk ``chunk``.

    ``kind`` is ``"F"`` (forward), ``"B"`` (full backward), or ``"I"`` / ``"W"`` where the backward is split
    into the input gradient (sent upstream) and the weight gradient (local, may run later).
    """

    kind: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PipelineScheduleError(f"Action kind={self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("microbatch", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PipelineScheduleError(f"Action {name}={value!r} must be an integer >= 0")

    @property
    def label(self) -> str:
        """Short text: ``F3`` for chunk 0, ``F3c1`` for chunk 1."""
        return f"{self.kind}{self.microbatch}" + (f"c{self.chunk}" if self.chunk else "")

    def __str__(self) -> str:
        return f"{self.kind}(microbatch={self.microbatch}, chunk={self.chunk})"


@dataclass(frozen=True)
class Schedule:
    """Every pipeline rank's ordered actions; the executor runs exactly these.

    ``actions[rank]`` is a tuple of :class:`Action`. With ``layout="looped"`` chunk ``c`` of rank ``r``
    holds pipeline stage ``c * pp + r``; with ``"v"`` (``vpp=2``) chunk 0 holds stage ``r`` and chunk 1
    stage ``2 * pp - 1 - r``, so the first and the last stage share rank 0 and the middle boundary stays on
    rank ``pp - 1``. Either way there are ``pp * vpp`` stages. ``pairs[rank]`` lists the indices ``k`` where
    action ``k`` (a forward) and action ``k + 1`` (a backward of another microbatch) run as one overlapped
    pair (DualPipe-V): the executor posts the pair's communication together so that one's hides behind the
    other's compute. Constructing a schedule checks only its shape; :func:`pp_sched.validate` checks that it
    is complete, ordered and cannot deadlock.
    """

    name: str
    pp: int
    vpp: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...] = field(repr=False)
    layout: str = "looped"
    pairs: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in ("pp", "vpp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PipelineScheduleError(f"Schedule {name}={value!r} must be an integer >= 1")
        actions = tuple(tuple(rank_actions) for rank_actions in self.actions)
        if len(actions) != self.pp:
            raise PipelineScheduleError(f"Schedule has action lists for {len(actions)} ranks but pp={self.pp}")
        for rank, rank_actions in enumerate(actions):
            for i, action in enumerate(rank_actions):
                if not isinstance(action, Action):
                    raise PipelineScheduleError(f"rank {rank} action {i} is {action!r}, not an Action")
        object.__setattr__(self, "actions", actions)
        if self.layout not in LAYOUTS:
            raise PipelineScheduleError(f"Schedule layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.layout == "v" and self.vpp != 2:
            raise PipelineScheduleError(f"a V layout holds two chunks per rank, so vpp must be 2, got vpp={self.vpp}")
        pairs = tuple(tuple(p) for p in self.pairs) or ((),) * self.pp
        if len(pairs) != self.pp:
            raise PipelineScheduleError(f"Schedule has pair lists for {len(pairs)} ranks but pp={self.pp}")
        for rank, (rank_pairs, rank_actions) in enumerate(zip(pairs, actions)):
            for k in rank_pairs:
                if not 0 <= k < len(rank_actions) - 1:
                    raise PipelineScheduleError(f"rank {rank} pair at action {k} is outside its actions")
                first, second = rank_actions[k], rank_actions[k + 1]
                if first.kind != "F" or second.kind not in "BI" or first.microbatch == second.microbatch:
                    raise PipelineScheduleError(
                        f"rank {rank} pair at action {k} is {first}, {second}: a pair is a forward and then a "
                        "backward (B or I) of another microbatch"
                    )
        object.__setattr__(self, "pairs", pairs)

    @property
    def num_stages(self) -> int:
        """``pp * vpp``: the number of pipeline stages the model is split into."""
        return self.pp * self.vpp

    @property
    def split_backward(self) -> bool:
        """Whether any backward is split into ``I`` and ``W`` actions."""
        return any(a.kind in "IW" for rank_actions in self.actions for a in rank_actions)

    def stage_of(self, rank: int, chunk: int) -> int:
        """The pipeline stage that ``chunk`` of ``rank`` holds: ``chunk * pp + rank`` (looped placement), or
        ``rank`` and ``2 * pp - 1 - rank`` for chunks 0 and 1 (V placement)."""
        if not 0 <= rank < self.pp:
            raise PipelineScheduleError(f"rank={rank} is outside 0..{self.pp - 1} (pp={self.pp})")
        if not 0 <= chunk < self.vpp:
            raise PipelineScheduleError(f"chunk={chunk} is outside 0..{self.vpp - 1} (vpp={self.vpp})")
        return stage_of(self.layout, self.pp, rank, chunk)

    def placement(self, stage: int) -> tuple[int, int]:
        """The ``(rank, chunk)`` that holds ``stage``; the inverse of :meth:`stage_of`."""
        if not 0 <= stage < self.num_stages:
            raise PipelineScheduleError(f"stage={stage} is outside 0..{self.num_stages - 1}")
        return place(self.layout, self.pp, stage)

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that holds ``stage``."""
        return self.placement(stage)[0]

    def with_actions(self, actions: Iterable[Iterable[Action]], pairs: Iterable[Iterable[int]] = ()) -> Schedule:
        """A copy with other actions (for hand-edited schedules); check it with :func:`pp_sched.validate`."""
        return Schedule(
            self.name,
            self.pp,
            self.vpp,
            self.microbatches,
            tuple(tuple(a) for a in actions),
            self.layout,
            tuple(tuple(p) for p in pairs),
        )


def stage_of(placement: str, pp: int, rank: int, chunk: int) -> int:
    """The stage chunk ``chunk`` of pipeline rank ``rank`` holds under ``placement`` (see :class:`Schedule`)."""
    if placement == "v":
        return rank if chunk == 0 else 2 * pp - 1 - rank
    return chunk * pp + rank


def place(placement: str, pp: int, stage: int) -> tuple[int, int]:
    """The ``(rank, chunk)`` holding ``stage`` under ``placement``; the inverse of :func:`stage_of`."""
    if placement == "v":
        return (stage, 0) if stage < pp else (2 * pp - 1 - stage, 1)
    return stage % pp, stage // pp
