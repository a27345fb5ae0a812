"""ZB-H1 style zero-bubble schedule: the backward is split into ``I`` (input gradient, on the critical path)
and ``W`` (weight gradient, local), and ``W`` actions fill the bubbles of 1F1B.

The order is built greedily on a model of time with unit costs (F = I = W = 1, i.e. a backward twice a
forward): at each step a free rank runs, in this priority, the next ``I`` whose gradient has arrived;
its oldest pending ``W`` if ``pp`` are pending; the next ``F`` whose input has arrived while fewer than
``min(pp - rank, microbatches)`` microbatches are between their ``F`` and ``I`` (1F1B's activation
memory; after ``I`` a microbatch holds only what ``W`` needs); else its oldest pending ``W``. With
``microbatches >= pp`` this gives ZB-H1's bubble ``(pp - 1) / (3 m + pp - 1)``. The result is plain data
and runs deadlock-free under any costs.
"""

from __future__ import annotations

from collections import deque

from ..action import Action

_NEVER = float("inf")


def zero_bubble_h1(pp: int, microbatches: int) -> list[list[Action]]:
    """Every rank's ``F``/``I``/``W`` order (see the module docstring)."""
    m = microbatches
    limit = [min(pp - rank, m) for rank in range(pp)]
    next_f = [0] * pp
    next_i = [0] * pp
    held = [0] * pp
    pending_w: list[deque[int]] = [deque() for _ in range(pp)]
    f_end: dict[tuple[int, int], int] = {}
    i_end: dict[tuple[int, int], int] = {}
    actions: list[list[Action]] = [[] for _ in range(pp)]
    remaining = 3 * m * pp
    t = 0
    while remaining:
        for rank in range(pp):
            i_mb, f_mb = next_i[rank], next_f[rank]
            if i_mb < f_mb and (rank == pp - 1 or i_end.get((rank + 1, i_mb), _NEVER) <= t):
                action = Action("I", i_mb)
                i_end[(rank, i_mb)] = t + 1
                next_i[rank] += 1
                pending_w[rank].append(i_mb)
                held[rank] -= 1
            elif len(pending_w[rank]) >= pp:
                action = Action("W", pending_w[rank].popleft())
            elif f_mb < m and held[rank] < limit[rank] and (rank == 0 or f_end.get((rank - 1, f_mb), _NEVER) <= t):
                action = Action("F", f_mb)
                f_end[(rank, f_mb)] = t + 1
                next_f[rank] += 1
                held[rank] += 1
            elif pending_w[rank]:
                action = Action("W", pending_w[rank].popleft())
            else:
                continue
            actions[rank].append(action)
            remaining -= 1
        t += 1
        if t > 6 * m * pp + pp:  # every step runs at least one action somewhere; never reached
            raise AssertionError("zero-bubble construction made no progress")
    return actions
