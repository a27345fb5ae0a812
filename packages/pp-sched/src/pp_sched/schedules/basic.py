"""GPipe and 1F1B (PipeDream-flush, Megatron's non-interleaved schedule): one model chunk per rank."""

from __future__ import annotations

from ..action import Action


def gpipe(pp: int, microbatches: int) -> list[list[Action]]:
    """Every rank runs all forwards, then all backwards, both in microbatch order."""
    order = [Action("F", mb) for mb in range(microbatches)] + [Action("B", mb) for mb in range(microbatches)]
    return [list(order) for _ in range(pp)]


def warmup_forwards(pp: int, rank: int, microbatches: int) -> int:
    """Forwards 1F1B runs on ``rank`` before its first backward is due: ``min(pp - rank - 1, microbatches)``."""
    return min(pp - rank - 1, microbatches)


def one_f_one_b(pp: int, microbatches: int) -> list[list[Action]]:
    """Warmup of ``pp - rank - 1`` forwards, then one forward and one backward in turn, then the last backwards.

    A rank holds at most ``pp - rank`` microbatches of activations, instead of GPipe's ``microbatches``.
    """
    ranks = []
    for rank in range(pp):
        warmup = warmup_forwards(pp, rank, microbatches)
        actions = [Action("F", mb) for mb in range(warmup)]
        for k in range(microbatches - warmup):
            actions += [Action("F", warmup + k), Action("B", k)]
        actions += [Action("B", mb) for mb in range(microbatches - warmup, microbatches)]
        ranks.append(actions)
    return ranks


def one_f_one_b_paired(pp: int, microbatches: int) -> tuple[list[list[Action]], list[list[int]]]:
    """1F1B whose steady-state ``(F, B)`` steps are overlapped pairs (MoE all-to-all overlap): every rank
    warms up with one more forward (``min(pp - rank, microbatches)``), so that even the last stage pairs
    the forward of one microbatch with the backward of an earlier one, and each pair can run as one unit
    (its gradient comes from a pair of the next rank that needs nothing this pair produces). A rank holds
    one activation set more than in 1F1B. Returns the actions and the indices of the pairs' forwards."""
    ranks, pairs = [], []
    for rank in range(pp):
        warmup = min(pp - rank, microbatches)
        actions = [Action("F", mb) for mb in range(warmup)]
        starts = []
        for k in range(microbatches - warmup):
            starts.append(len(actions))
            actions += [Action("F", warmup + k), Action("B", k)]
        actions += [Action("B", mb) for mb in range(microbatches - warmup, microbatches)]
        ranks.append(actions)
        pairs.append(starts)
    return ranks, pairs
