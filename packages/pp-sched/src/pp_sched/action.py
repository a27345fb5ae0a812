"""The data a schedule is made of: ``Action`` (one step on one rank) and ``Schedule`` (every rank's steps)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import PipelineScheduleError

#: Action kinds: forward, full backward, input-gradient backward, weight-gradient backward.
KINDS = ("F", "B", "I", "W")


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

    ``actions[rank]`` is a tuple of :class:`Action`. Chunk ``c`` of rank ``r`` holds pipeline stage
    ``c * pp + r`` (looped placement), so there are ``pp * vpp`` stages. Constructing a schedule checks only
    its shape; :func:`pp_sched.validate` checks that it is complete, ordered and cannot deadlock.
    """

    name: str
    pp: int
    vpp: int
    microbatches: int
    actions: tuple[tuple[Action, ...], ...] = field(repr=False)

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

    @property
    def num_stages(self) -> int:
        """``pp * vpp``: the number of pipeline stages the model is split into."""
        return self.pp * self.vpp

    @property
    def split_backward(self) -> bool:
        """Whether any backward is split into ``I`` and ``W`` actions."""
        return any(a.kind in "IW" for rank_actions in self.actions for a in rank_actions)

    def stage_of(self, rank: int, chunk: int) -> int:
        """The pipeline stage that ``chunk`` of ``rank`` holds: ``chunk * pp + rank``."""
        if not 0 <= rank < self.pp:
            raise PipelineScheduleError(f"rank={rank} is outside 0..{self.pp - 1} (pp={self.pp})")
        if not 0 <= chunk < self.vpp:
            raise PipelineScheduleError(f"chunk={chunk} is outside 0..{self.vpp - 1} (vpp={self.vpp})")
        return chunk * self.pp + rank

    def placement(self, stage: int) -> tuple[int, int]:
        """The ``(rank, chunk)`` that holds ``stage``; the inverse of :meth:`stage_of`."""
        if not 0 <= stage < self.num_stages:
            raise PipelineScheduleError(f"stage={stage} is outside 0..{self.num_stages - 1}")
        return stage % self.pp, stage // self.pp

    def with_actions(self, actions: Iterable[Iterable[Action]]) -> Schedule:
        """A copy with other actions (for hand-edited schedules); check it with :func:`pp_sched.validate`."""
        return Schedule(self.name, self.pp, self.vpp, self.microbatches, tuple(tuple(a) for a in actions))
