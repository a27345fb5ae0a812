"""V-shaped schedules: two chunks per rank, chunk 0 of rank ``r`` on stage ``r`` and chunk 1 on stage
``2 * pp - 1 - r``, so a microbatch goes down the ranks and back up, and rank 0 holds both the first and
the last stage (its loss is computed where its backward starts).

Both are built greedily on a model of time with unit costs (F = I = W = 1, B = I + W): at each step a
free rank picks its next action by a fixed priority. Activations are bounded as in 1F1B: rank ``r``
holds at most ``2 * (pp - r) - 1`` chunk-0 and ``2 * r + 1`` chunk-1 sets between ``F`` and their
input-gradient pass, ``2 * pp`` half-rank sets in all (1F1B's ``pp`` whole-rank sets on rank 0).

- **ZB-V** (``zb_v``): the backward is always split. Priority: the input gradient ``I`` whose output
  gradient has arrived (the oldest microbatch, chunk 1 first on a tie); the oldest pending ``W`` if
  ``pp`` are pending; the next ``F`` whose input has arrived (chunk 1 first) within the bound; else a
  pending ``W``.
- **DualPipe-V** (``dualpipe_v``): when a rank has both a forward and a backward ready it runs them as
  one overlapped pair ``(F, B)`` (full backward), recorded in ``Schedule.pairs``; a backward alone (the
  warm-up's end and the cool-down) is split into ``I`` with ``W`` deferred into the bubbles.

The results are plain data and run deadlock-free under any costs (the construction only places an
action after everything it depends on).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..action import Action

_NEVER = float("inf")
_COST = {"F": 1, "B": 2, "I": 1, "W": 1}


@dataclass
class _Rank:
    """One rank's progress while the schedule is built."""

    rank: int
    limits: tuple[int, int]
    next_f: list[int] = field(default_factory=lambda: [0, 0])
    next_b: list[int] = field(default_factory=lambda: [0, 0])
    held: list[int] = field(default_factory=lambda: [0, 0])
    pending_w: deque[tuple[int, int]] = field(default_factory=deque)
    free: int = 0
    actions: list[Action] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)


class _Builder:
    """The model of time both V schedules are built on."""

    def __init__(self, pp: int, microbatches: int):
        self.pp, self.m = pp, microbatches
        self.stages = 2 * pp
        self.f_end: dict[tuple[int, int], int] = {}  # (microbatch, stage) -> end of its F
        self.g_end: dict[tuple[int, int], int] = {}  # (microbatch, stage) -> end of its B or I
        self.ranks = [_Rank(r, (2 * pp - r - 1, r + 1)) for r in range(pp)]

    def stage(self, rank: int, chunk: int) -> int:
        return rank if chunk == 0 else self.stages - 1 - rank

    def forward_ready(self, state: _Rank, chunk: int, t: int) -> bool:
        mb = state.next_f[chunk]
        if mb >= self.m or state.held[chunk] >= state.limits[chunk]:
            return False
        stage = self.stage(state.rank, chunk)
        return stage == 0 or self.f_end.get((mb, stage - 1), _NEVER) <= t

    def backward_ready(self, state: _Rank, chunk: int, t: int) -> bool:
        mb = state.next_b[chunk]
        stage = self.stage(state.rank, chunk)
        if mb >= state.next_f[chunk] or self.f_end[(mb, stage)] > t:
            return False
        return stage == self.stages - 1 or self.g_end.get((mb, stage + 1), _NEVER) <= t

    def run(self, state: _Rank, kind: str, chunk: int, start: int) -> int:
        """Append ``kind`` on ``chunk`` to the rank's actions, starting at ``start``; returns its end."""
        stage = self.stage(state.rank, chunk)
        end = start + _COST[kind]
        if kind == "F":
            mb = state.next_f[chunk]
            state.next_f[chunk] += 1
            state.held[chunk] += 1
            self.f_end[(mb, stage)] = end
        elif kind in "BI":
            mb = state.next_b[chunk]
            state.next_b[chunk] += 1
            state.held[chunk] -= 1
            self.g_end[(mb, stage)] = end
            if kind == "I":
                state.pending_w.append((mb, chunk))
        else:
            mb, chunk = state.pending_w.popleft()
        state.actions.append(Action(kind, mb, chunk))
        state.free = end
        return end

    def build(self, pick: Callable[[_Builder, _Rank, int], None]) -> tuple[list[list[Action]], list[list[int]]]:
        limit = 12 * self.m * self.pp + 4  # far beyond the serial time of all actions
        t = 0
        while not all(s.next_b == [self.m, self.m] and not s.pending_w for s in self.ranks):
            for state in self.ranks:
                if state.free <= t:
                    pick(self, state, t)
            t += 1
            if t > limit:  # every busy period ends in an action somewhere; never reached
                raise AssertionError("V schedule construction made no progress")
        return [s.actions for s in self.ranks], [s.pairs for s in self.ranks]


def _ready_backward(b: _Builder, state: _Rank, t: int) -> int | None:
    """The chunk whose backward to run next: the older microbatch, chunk 1 on a tie."""
    ready = [c for c in (1, 0) if b.backward_ready(state, c, t)]
    return min(ready, key=lambda c: state.next_b[c]) if ready else None


def _ready_forward(b: _Builder, state: _Rank, t: int) -> int | None:
    return next((c for c in (1, 0) if b.forward_ready(state, c, t)), None)


def _zb_v_pick(b: _Builder, state: _Rank, t: int) -> None:
    chunk = _ready_backward(b, state, t)
    if chunk is not None:
        b.run(state, "I", chunk, t)
    elif len(state.pending_w) >= b.pp:
        b.run(state, "W", 0, t)
    elif (chunk := _ready_forward(b, state, t)) is not None:
        b.run(state, "F", chunk, t)
    elif state.pending_w:
        b.run(state, "W", 0, t)


def _dualpipe_v_pick(b: _Builder, state: _Rank, t: int) -> None:
    back, fwd = _ready_backward(b, state, t), _ready_forward(b, state, t)
    if back is not None and fwd is not None:
        state.pairs.append(len(state.actions))
        end = b.run(state, "F", fwd, t)
        b.run(state, "B", back, end)
    elif back is not None:
        b.run(state, "I", back, t)
    elif len(state.pending_w) >= b.pp:
        b.run(state, "W", 0, t)
    elif fwd is not None:
        b.run(state, "F", fwd, t)
    elif state.pending_w:
        b.run(state, "W", 0, t)


def zb_v(pp: int, microbatches: int) -> list[list[Action]]:
    """Every rank's ZB-V actions (see the module docstring)."""
    return _Builder(pp, microbatches).build(_zb_v_pick)[0]


def dualpipe_v(pp: int, microbatches: int) -> tuple[list[list[Action]], list[list[int]]]:
    """Every rank's DualPipe-V actions and the indices of its overlapped ``(F, B)`` pairs."""
    return _Builder(pp, microbatches).build(_dualpipe_v_pick)
