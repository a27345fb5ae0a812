"""Run a schedule on a model of time: each rank executes its actions in order, each action waits for the
actions it depends on (on other stages and its own), and the result gives timelines, bubble and memory.

Dependencies, for microbatch ``mb`` on stage ``s`` of ``S`` stages:

- ``F`` needs ``F`` of stage ``s - 1`` (the input activation), except on stage 0;
- ``B`` and ``I`` need ``F`` of stage ``s`` and the input gradient of stage ``s + 1`` (its ``B`` or ``I``),
  except on the last stage, where the loss is computed from its own ``F``;
- ``W`` needs ``I`` of stage ``s``.

A dependency produced on another rank arrives ``comm`` time units after it finishes. Sends are
buffered: a rank never waits for its receiver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

from .action import Action, Schedule
from .errors import PipelineScheduleError
from .structure import check_structure


@dataclass(frozen=True)
class Slot:
    """One action on the timeline of a rank: it runs from ``start`` to ``end``."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """The result of :func:`simulate`.

    ``timelines[rank]`` lists the rank's slots in order. ``bubble_fraction`` is the idle time of all ranks
    over ``pp * makespan``; ``idle_fractions[rank]`` is one rank's idle time over ``makespan``.
    ``peak_activations[rank]`` is the largest number of ``(microbatch, chunk)`` activation sets the rank
    holds at once: one is held from the start of its ``F`` until the end of its ``B`` or ``I``. With
    ``vpp > 1`` each set is one chunk's, ``1 / vpp`` of the rank's layers. ``peak_pending_w[rank]`` is
    the largest number of sets whose ``I`` has run and ``W`` not yet: each holds only what ``W`` needs
    (the inputs of the layers' weight products and the gradients captured at them), a fraction of a
    full set (about half for a stack of ``Linear`` layers, less with activations and attention).
    """

    schedule: Schedule
    timelines: tuple[tuple[Slot, ...], ...]
    makespan: float
    bubble_fraction: float
    idle_fractions: tuple[float, ...]
    peak_activations: tuple[int, ...]
    peak_pending_w: tuple[int, ...] = ()


def action_costs(vpp: int, forward: Real, backward: Real, weight: Real | None) -> dict[str, Real]:
    """The duration of each action kind on one chunk (costs are per microbatch for all of a rank's layers)."""
    for name, value in (("forward", forward), ("backward", backward)):
        if not isinstance(value, Real) or not value > 0:
            raise PipelineScheduleError(f"{name}={value!r} must be a number > 0")
    w = backward / 2 if weight is None else weight
    if not isinstance(w, Real) or not 0 < w < backward:
        raise PipelineScheduleError(f"weight={weight!r} must be a number with 0 < weight < backward={backward}")
    return {"F": forward / vpp, "B": backward / vpp, "I": (backward - w) / vpp, "W": w / vpp}


def _needs(schedule: Schedule, rank: int, action: Action) -> list[tuple[str, int, int]]:
    """The ``(kind, microbatch, stage)`` results ``action`` waits for; kind ``G`` is an input gradient."""
    mb, stage = action.microbatch, schedule.stage_of(rank, action.chunk)
    if action.kind == "F":
        return [("F", mb, stage - 1)] if stage > 0 else []
    if action.kind == "W":
        return [("G", mb, stage)]
    needs = [("F", mb, stage)]
    if stage < schedule.num_stages - 1:
        needs.append(("G", mb, stage + 1))
    return needs


def _describe(schedule: Schedule, need: tuple[str, int, int], position: list[int]) -> str:
    kind, mb, stage = need
    rank, chunk = schedule.placement(stage)
    what = f"F(microbatch={mb}, chunk={chunk})" if kind == "F" else f"the B or I of microbatch {mb}, chunk {chunk}"
    blocked = ""
    if position[rank] < len(schedule.actions[rank]):
        blocked = f", itself stuck at action {position[rank]} {schedule.actions[rank][position[rank]]}"
    return f"{what} on stage {stage} (rank {rank}{blocked})"


def _run(
    schedule: Schedule, costs: dict[str, Real], comm: Real, scale: Sequence[Real] | None = None, joint: bool = False
) -> list[list[Slot]]:
    """Execute every rank in order; raise :class:`PipelineScheduleError` naming the stuck actions.

    ``joint``: each pair of ``Schedule.pairs`` runs as one unit, as an executor that interleaves the two
    (MoE all-to-all overlap) runs it: it starts once both actions' inputs are there, and both results
    are sent when the pair ends."""
    done: dict[tuple[str, int, int], tuple[Real, int]] = {}  # result -> (finish time, producing rank)
    position = [0] * schedule.pp
    free: list[Real] = [0] * schedule.pp
    timelines: list[list[Slot]] = [[] for _ in range(schedule.pp)]
    paired = [set(p) if joint else set() for p in schedule.pairs]
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(schedule.actions):
            while position[rank] < len(actions):
                unit = actions[position[rank] : position[rank] + (2 if position[rank] in paired[rank] else 1)]
                needs = [need for action in unit for need in _needs(schedule, rank, action)]
                if any(need not in done for need in needs):
                    break
                start = free[rank]
                for need in needs:
                    end, producer = done[need]
                    start = max(start, end + (comm if producer != rank else 0))
                results = []
                for action in unit:
                    stage = schedule.stage_of(rank, action.chunk)
                    end = start + (costs[action.kind] if scale is None else costs[action.kind] * scale[stage])
                    timelines[rank].append(Slot(action, start, end))
                    results.append(("G" if action.kind in "BI" else action.kind, action.microbatch, stage))
                    start = end
                for result in results:
                    done[result] = (end, rank)
                free[rank] = end
                position[rank] += len(unit)
                progress = True
    stuck = [r for r in range(schedule.pp) if position[r] < len(schedule.actions[r])]
    if stuck:
        lines = []
        for rank in stuck:
            action = schedule.actions[rank][position[rank]]
            unit = schedule.actions[rank][
                position[rank] : position[rank] + (2 if position[rank] in paired[rank] else 1)
            ]
            missing = [n for a in unit for n in _needs(schedule, rank, a) if n not in done]
            waits = "; ".join(_describe(schedule, n, position) for n in missing)
            lines.append(f"  rank {rank} is stuck at action {position[rank]} {action}, waiting for {waits}")
        raise PipelineScheduleError("deadlock: no rank can make progress\n" + "\n".join(lines))
    return timelines


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most ``(microbatch, chunk)`` activation sets held at once (see :class:`Simulation`)."""
    return _peaks(schedule, "F", "BI")


def peak_pending_w(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most sets whose ``I`` ran and ``W`` has not (see :class:`Simulation`)."""
    return _peaks(schedule, "I", "W")


def _peaks(schedule: Schedule, opens: str, closes: str) -> tuple[int, ...]:
    peaks = []
    for actions in schedule.actions:
        held = peak = 0
        for action in actions:
            if action.kind in opens:
                held += 1
                peak = max(peak, held)
            elif action.kind in closes:
                held -= 1
        peaks.append(peak)
    return tuple(peaks)


def simulate(
    schedule: Schedule,
    forward: Real = 1.0,
    backward: Real = 2.0,
    weight: Real | None = None,
    *,
    comm: Real = 0,
    stage_costs: Sequence[Real] | None = None,
) -> Simulation:
    """Simulate ``schedule``: checks it (:class:`PipelineScheduleError` names what is wrong or stuck) and
    returns its :class:`Simulation`.

    ``forward`` and ``backward`` are the times of one microbatch through all of a rank's layers, so one
    action on one of ``vpp`` chunks takes ``1 / vpp`` of them. A split backward costs ``W = weight``
    (default ``backward / 2``) and ``I = backward - weight``. ``comm`` is added to every dependency
    between ranks. ``stage_costs``, one number per stage (for an uneven split, e.g. its layers plus
    the embedding's and the head's share), scales each stage's actions by its cost over the mean cost, so
    ``forward`` and ``backward`` stay the times of an average rank.
    """
    check_structure(schedule)
    costs = action_costs(schedule.vpp, forward, backward, weight)
    if not isinstance(comm, Real) or comm < 0:
        raise PipelineScheduleError(f"comm={comm!r} must be a number >= 0")
    scale = None
    if stage_costs is not None:
        stage_costs = list(stage_costs)
        if len(stage_costs) != schedule.num_stages:
            raise PipelineScheduleError(
                f"stage_costs has {len(stage_costs)} entries but the schedule has {schedule.num_stages} stages"
            )
        for stage, cost in enumerate(stage_costs):
            if not isinstance(cost, Real) or not cost > 0:
                raise PipelineScheduleError(f"stage_costs[{stage}]={cost!r} must be a number > 0")
        mean = sum(stage_costs) / len(stage_costs)
        scale = [cost / mean for cost in stage_costs]
    timelines = _run(schedule, costs, comm, scale)
    makespan = max((line[-1].end for line in timelines if line), default=0)
    busy = [sum(slot.end - slot.start for slot in line) for line in timelines]
    idle = tuple(1 - b / makespan for b in busy)
    return Simulation(
        schedule=schedule,
        timelines=tuple(tuple(line) for line in timelines),
        makespan=makespan,
        bubble_fraction=1 - sum(busy) / (schedule.pp * makespan),
        idle_fractions=idle,
        peak_activations=peak_activations(schedule),
        peak_pending_w=peak_pending_w(schedule),
    )


def validate(schedule: Schedule) -> None:
    """Check a (possibly hand-edited) schedule before it runs: every ``(microbatch, stage)`` has exactly
    one ``F`` and one ``B`` (or one ``I`` and one ``W``), each rank's order is consistent, and the
    cross-rank dependencies cannot deadlock, also with each pair of ``Schedule.pairs`` run as one unit (both
    inputs before it starts, both outputs after it ends). Raises :class:`PipelineScheduleError` naming the action."""
    check_structure(schedule)
    costs = action_costs(schedule.vpp, 1, 2, None)
    _run(schedule, costs, 0)
    if any(schedule.pairs):
        try:
            _run(schedule, costs, 0, joint=True)
        except PipelineScheduleError as error:
            raise PipelineScheduleError(f"the pairs cannot run as units (overlapped): {error}") from None
