"""Megatron's interleaved 1F1B: ``vpp`` model chunks per rank, microbatches taken in groups.

The forward order of a rank walks a table: for each group of ``group_size`` microbatches, chunk 0 of all
of them, then chunk 1, ... The k-th backward is the k-th table entry with its chunk mirrored
(``vpp - 1 - chunk``). Rank ``r`` runs ``2 * (pp - r - 1) + (vpp - 1) * group_size`` warmup forwards, then
alternates forward and backward, then runs the remaining backwards.
"""

from __future__ import annotations

from ..action import Action
from ..errors import PipelineScheduleError


def schedule_table(microbatches: int, vpp: int, group_size: int) -> list[tuple[int, int]]:
    """The ``(microbatch, chunk)`` forward order shared by every rank; the last group takes the remainder."""
    table = []
    for start in range(0, microbatches, group_size):
        stop = microbatches if start + group_size >= microbatches else start + group_size
        table += [(mb, chunk) for chunk in range(vpp) for mb in range(start, stop)]
    return table


def check(pp: int, microbatches: int, vpp: int, group_size: int) -> None:
    """Megatron's rules for interleaving; raises :class:`PipelineScheduleError` naming the one broken."""
    if pp < 2:
        raise PipelineScheduleError(f"interleaved-1f1b needs pp >= 2 to interleave, got pp={pp}")
    if vpp < 2:
        raise PipelineScheduleError(f"interleaved-1f1b needs vpp >= 2 chunks per rank, got vpp={vpp}; use '1f1b'")
    if not pp <= group_size <= microbatches:
        raise PipelineScheduleError(
            f"interleaved-1f1b needs pp <= group_size <= microbatches, got pp={pp}, group_size={group_size}, "
            f"microbatches={microbatches} (fewer microbatches than pp cannot fill the interleaved pipeline)"
        )
    remainder = microbatches % group_size
    if 0 < remainder < pp:
        raise PipelineScheduleError(
            f"interleaved-1f1b needs microbatches % group_size to be 0 or >= pp, got microbatches={microbatches}, "
            f"group_size={group_size} (remainder {remainder}), pp={pp}; with the default group_size=pp this means "
            f"microbatches must be a multiple of pp"
        )


def interleaved_1f1b(pp: int, microbatches: int, vpp: int, group_size: int) -> list[list[Action]]:
    """Every rank's actions (see the module docstring); call :func:`check` first."""
    table = schedule_table(microbatches, vpp, group_size)
    total = len(table)
    ranks = []
    for rank in range(pp):
        warmup = min(2 * (pp - rank - 1) + (vpp - 1) * group_size, total)

        def forward(k: int) -> Action:
            return Action("F", table[k][0], table[k][1])

        def backward(k: int) -> Action:
            return Action("B", table[k][0], vpp - 1 - table[k][1])

        actions = [forward(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [forward(warmup + k), backward(k)]
        actions += [backward(k) for k in range(total - warmup, total)]
        ranks.append(actions)
    return ranks
