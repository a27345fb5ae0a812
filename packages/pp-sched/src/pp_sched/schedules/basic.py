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
