"""``split_layers``: which global layer indices each pipeline stage holds (embedding first, head last)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .action import LAYOUTS, place
from .errors import PipelineScheduleError

#: ``uneven`` value that counts the embedding and the head as one layer each when splitting.
EMBEDDING_HEAD = "embedding-head"


@dataclass(frozen=True)
class StageLayers:
    """The part of the model on one stage: global transformer ``layers``, and whether the stage also holds
    the ``embedding`` (stage 0) or the output ``head`` and loss (the last stage). The stage lives on
    ``rank`` as its model ``chunk`` (``stage == chunk * pp + rank``)."""

    stage: int
    rank: int
    chunk: int
    layers: range
    embedding: bool
    head: bool


def _counts(num_layers: int, stages: int, uneven: str | Sequence[int] | None) -> list[int]:
    if uneven is None:
        if num_layers % stages:
            raise PipelineScheduleError(
                f"num_layers={num_layers} does not split evenly over pp*vpp={stages} stages; pass "
                f"uneven={EMBEDDING_HEAD!r} or uneven=[layers per stage]"
            )
        return [num_layers // stages] * stages
    if isinstance(uneven, str):
        if uneven != EMBEDDING_HEAD:
            raise PipelineScheduleError(f"uneven={uneven!r} is not {EMBEDDING_HEAD!r} or a list of layers per stage")
        if (num_layers + 2) % stages:
            raise PipelineScheduleError(
                f"uneven={EMBEDDING_HEAD!r} counts the embedding and the head as one layer each, so "
                f"num_layers+2={num_layers + 2} must be divisible by pp*vpp={stages} stages"
            )
        counts = [(num_layers + 2) // stages] * stages
        counts[0] -= 1
        counts[-1] -= 1
        return counts
    counts = list(uneven)
    if len(counts) != stages:
        raise PipelineScheduleError(f"uneven lists {len(counts)} layer counts but there are pp*vpp={stages} stages")
    for stage, count in enumerate(counts):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise PipelineScheduleError(f"uneven[{stage}]={count!r} must be an integer >= 0")
    if sum(counts) != num_layers:
        raise PipelineScheduleError(f"uneven={counts} sums to {sum(counts)}, but num_layers={num_layers}")
    return counts


def split_layers(
    num_layers: int,
    *,
    pp: int,
    vpp: int = 1,
    uneven: str | Sequence[int] | None = None,
    layout: str = "looped",
) -> tuple[StageLayers, ...]:
    """Split ``num_layers`` consecutive layers over the ``pp * vpp`` stages, in stage order.

    By default every stage gets the same number (it must divide). ``uneven="embedding-head"`` counts the
    embedding and the head as one layer each, so the first and last stage get one layer fewer (Megatron's
    ``account_for_embedding_in_pipeline_split`` and ``..._loss_...``); a list gives each stage's count.
    ``layout`` places the stages on ranks as the schedule does (``schedule.layout``: ``"looped"`` or
    ``"v"``). Returns one :class:`StageLayers` per stage; raises :class:`PipelineScheduleError` naming the rule.
    """
    for name, value in (("num_layers", num_layers), ("pp", pp), ("vpp", vpp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineScheduleError(f"{name}={value!r} must be an integer >= 1")
    if layout not in LAYOUTS:
        raise PipelineScheduleError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "v" and vpp != 2:
        raise PipelineScheduleError(f"layout='v' holds two chunks per rank, so vpp must be 2, got vpp={vpp}")
    stages = pp * vpp
    counts = _counts(num_layers, stages, uneven)
    result, first = [], 0
    for stage, count in enumerate(counts):
        rank, chunk = place(layout, pp, stage)
        result.append(
            StageLayers(
                stage=stage,
                rank=rank,
                chunk=chunk,
                layers=range(first, first + count),
                embedding=stage == 0,
                head=stage == stages - 1,
            )
        )
        first += count
    return tuple(result)


def stage_costs(stages: Sequence[StageLayers], *, embedding: float = 1.0, head: float = 1.0) -> list[float]:
    """Each stage's relative compute for :func:`pp_sched.simulate`: its transformer layers, plus
    ``embedding`` and ``head`` (in layers' worth) where it holds them. A stage must cost something: one
    with no transformer layers needs the embedding or the head."""
    costs = []
    for s in stages:
        cost = len(s.layers) + (embedding if s.embedding else 0.0) + (head if s.head else 0.0)
        if not cost > 0:
            raise PipelineScheduleError(f"stage {s.stage} holds no layer, embedding or head; every stage needs work")
        costs.append(float(cost))
    return costs
