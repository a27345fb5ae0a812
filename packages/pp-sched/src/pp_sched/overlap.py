"""Overlapped pairs: what :class:`~pp_sched.PipelineExecutor` needs to run a forward and another
microbatch's backward interleaved (MoE all-to-all overlap, ``overlap=True``).

A model chunk takes part when it has a ``staged_run()`` method returning an object whose
``forward(*inputs)`` and ``backward(outputs, grads)`` are generators (``moe_dispatch.StagedStack`` is
one): each ``next()`` waits for the chunk's last asynchronous collective, computes up to the next one and
launches it; the generator's value is the forward's outputs (a tuple; a 1-tuple stands for one tensor)
or the inputs' gradients, which the backward also accumulates into the inputs (a leaf's ``.grad``).
:func:`pstate.interleave` advances two such generators in turn, so one's communication travels while the
other computes.
"""

from __future__ import annotations

from typing import Any

from .action import Action, Schedule


def can_stage(chunk: Any) -> bool:
    """Whether ``chunk`` can run cut into steps (has ``staged_run``)."""
    return callable(getattr(chunk, "staged_run", None))


def merge_split_backward(schedule: Schedule) -> Schedule:
    """``schedule`` with each ``I`` run as a whole ``B`` and its ``W`` dropped (pairs re-indexed): a staged
    chunk's backward computes the input and the weight gradients in one pass. The messages are the same,
    so the schedule stays as valid as it was."""
    if not schedule.split_backward:
        return schedule
    actions, pairs = [], []
    for rank_actions, rank_pairs in zip(schedule.actions, schedule.pairs):
        index: dict[int, int] = {}
        kept: list[Action] = []
        for k, action in enumerate(rank_actions):
            if action.kind == "W":
                continue
            index[k] = len(kept)
            kept.append(Action("B", action.microbatch, action.chunk) if action.kind == "I" else action)
        actions.append(kept)
        pairs.append([index[k] for k in rank_pairs])
    return schedule.with_actions(actions, pairs)
