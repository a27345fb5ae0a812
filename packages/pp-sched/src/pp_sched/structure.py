"""Static checks of a schedule: every action in range, each (microbatch, stage) forwarded and backwarded
exactly once, and each rank's order consistent. Cross-rank deadlocks are found by the simulator."""

from __future__ import annotations

from .action import Schedule
from .errors import PipelineScheduleError


def _where(schedule: Schedule, stage: int) -> str:
    rank, chunk = schedule.placement(stage)
    return f"stage {stage} (rank {rank}, chunk {chunk})"


def check_structure(schedule: Schedule) -> None:
    """Raise :class:`PipelineScheduleError` naming the first action (or missing action) that is wrong."""
    if not isinstance(schedule, Schedule):
        raise PipelineScheduleError(f"expected a Schedule, got {type(schedule).__name__}")
    m, vpp = schedule.microbatches, schedule.vpp
    # position of each (kind, microbatch, stage) on the rank that holds the stage
    seen: dict[tuple[str, int, int], int] = {}
    for rank, actions in enumerate(schedule.actions):
        for i, action in enumerate(actions):
            if action.chunk >= vpp:
                raise PipelineScheduleError(
                    f"rank {rank} action {i} {action} names chunk {action.chunk}, but vpp={vpp} (chunks 0..{vpp - 1})"
                )
            if action.microbatch >= m:
                raise PipelineScheduleError(
                    f"rank {rank} action {i} {action} names microbatch {action.microbatch}, "
                    f"but microbatches={m} (0..{m - 1})"
                )
            key = (action.kind, action.microbatch, schedule.stage_of(rank, action.chunk))
            if key in seen:
                raise PipelineScheduleError(f"rank {rank} runs {action} twice (actions {seen[key]} and {i})")
            seen[key] = i
    for stage in range(schedule.num_stages):
        for mb in range(m):
            has = {kind for kind in "FBIW" if (kind, mb, stage) in seen}
            if "F" not in has:
                raise PipelineScheduleError(f"{_where(schedule, stage)} has no F for microbatch {mb}")
            if "B" in has and has & {"I", "W"}:
                raise PipelineScheduleError(
                    f"{_where(schedule, stage)} has both B and a split I/W backward for microbatch {mb}"
                )
            if "B" not in has and "I" not in has:
                raise PipelineScheduleError(f"{_where(schedule, stage)} has no B (or I and W) for microbatch {mb}")
            if "I" in has and "W" not in has:
                raise PipelineScheduleError(f"{_where(schedule, stage)} has I but no W for microbatch {mb}")
    for rank, actions in enumerate(schedule.actions):
        for i, action in enumerate(actions):
            stage = schedule.stage_of(rank, action.chunk)
            needs = {"B": "F", "I": "F", "W": "I"}.get(action.kind)
            if needs and seen[(needs, action.microbatch, stage)] > i:
                reason = "its forward's activations" if needs == "F" else "the output gradient that I received"
                raise PipelineScheduleError(
                    f"rank {rank} action {i} {action} comes before {needs}(microbatch={action.microbatch}, "
                    f"chunk={action.chunk}) at action {seen[(needs, action.microbatch, stage)]} (it needs {reason})"
                )
