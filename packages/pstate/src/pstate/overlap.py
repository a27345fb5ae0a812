"""Overlapping communication with compute without threads: runs written as generators that pause right
after launching an asynchronous collective, advanced in turn, so one run's message travels while
another computes (MoE all-to-all overlap in ``moe_dispatch``, paired actions in ``pp_sched``)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any


def interleave(*steps: Generator[Any, Any, Any]) -> list[Any]:
    """Advance the generators in turn until all are done; return each one's value. Each advance waits
    for that run's last collective, computes up to its next one and launches it. One generator alone:
    the same operations, no overlap."""
    results: list[Any] = [None] * len(steps)
    active = list(enumerate(steps))
    while active:
        for item in list(active):
            try:
                next(item[1])
            except StopIteration as stop:
                results[item[0]] = stop.value
                active.remove(item)
    return results
