"""``ParallelConfig``: the sizes of every parallel axis, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParallelConfigError

#: The axes an ``order`` string may name. The first axis in ``order`` varies fastest over ranks.
ORDER_AXES = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the parallel axes; ``dp`` is derived from the world size when not given.

    ``tp`` tensor, ``pp`` pipeline, ``vpp`` virtual pipeline chunks per pipeline rank, ``cp`` context,
    ``ep`` expert, ``etp`` expert tensor (defaults to ``tp``), ``dp`` data parallel. ``order`` is the
    rank order of the axes, Megatron-LM style: the first axis varies fastest. ``pipeline_layout``, when
    given, names how many transformer layers each of the ``pp * vpp`` virtual stages holds (uneven
    pipelines: the stages with the embedding and the head may hold fewer, even none). ``cp_a2a`` splits each
    CP group for hierarchical context parallelism: inner all-to-all groups of ``cp_a2a`` adjacent CP ranks
    and outer rings of ``cp / cp_a2a`` ranks (see :meth:`pstate.Layout.groups`). ``dp_shard`` (HSDP)
    splits the data-parallel ranks into shard groups of that many adjacent ranks (with their CP ranks)
    and replicate groups across them (:meth:`pstate.Layout.hsdp_groups`).

    Rules that need the world size are checked by :func:`pstate.layout`.
    """

    tp: int = 1
    """tensor-parallel size."""
    pp: int = 1
    """pipeline-parallel size (stages)."""
    vpp: int = 1
    """virtual pipeline chunks per pipeline rank (interleaved schedules)."""
    cp: int = 1
    """context-parallel size (the sequence split over ranks)."""
    ep: int = 1
    """expert-parallel size."""
    etp: int | None = None
    """expert tensor-parallel size (default: tp)."""
    dp: int | None = None
    """data-parallel size (default: what the world size leaves)."""
    order: str = DEFAULT_ORDER
    """rank order of the axes; the first varies fastest."""
    pipeline_layout: tuple[int, ...] | None = None
    """transformer layers per virtual pipeline stage, e.g. [3, 4, 4, 3] (default: an even split)."""
    cp_a2a: int = 1
    """ranks of each CP group's inner all-to-all groups (hierarchical context parallelism; divides cp)."""
    dp_shard: int | None = None
    """HSDP: adjacent data-parallel ranks one ZeRO-3 shard group spans, replicated across the rest (default: dp)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "cp", "ep", "etp", "dp", "cp_a2a", "dp_shard"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParallelConfigError(f"{name}={value!r} must be an integer")
            if value < 1:
                raise ParallelConfigError(f"{name}={value} must be >= 1")
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if not isinstance(self.order, str):
            raise ParallelConfigError(f"order={self.order!r} must be a string such as {DEFAULT_ORDER!r}")
        tokens = self.order.lower().split("-")
        for token in tokens:
            if token not in ORDER_AXES:
                raise ParallelConfigError(
                    f"order={self.order!r} names unknown axis {token!r}; axes are {', '.join(ORDER_AXES)}"
                )
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if repeated:
            raise ParallelConfigError(f"order={self.order!r} repeats axis {', '.join(repeated)}")
        object.__setattr__(self, "order", "-".join(tokens))
        for name in ("tp", "cp", "ep", "pp"):
            self.require_in_order(name, getattr(self, name))
        if self.dp is not None:
            self.require_in_order("dp", self.dp)
        if self.cp % self.cp_a2a:
            raise ParallelConfigError(
                f"cp_a2a={self.cp_a2a} must divide cp={self.cp}: each CP group splits into all-to-all groups of "
                "cp_a2a adjacent ranks"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ParallelConfigError(f"vpp={self.vpp} needs pipeline parallelism, but pp=1")
        if self.pipeline_layout is not None:
            layout = self.pipeline_layout
            if not isinstance(layout, (list, tuple)):
                raise ParallelConfigError(f"pipeline_layout={layout!r} must be a list of layers per virtual stage")
            if len(layout) != self.pp * self.vpp:
                raise ParallelConfigError(
                    f"pipeline_layout={list(layout)} names {len(layout)} stages but pp*vpp={self.pp * self.vpp}"
                )
            for stage, count in enumerate(layout):
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise ParallelConfigError(f"pipeline_layout[{stage}]={count!r} must be an integer >= 0")
            object.__setattr__(self, "pipeline_layout", tuple(layout))

    def require_in_order(self, axis: str, size: int) -> None:
        """Raise if ``axis`` has ``size > 1`` but ``order`` does not place it."""
        if size > 1 and axis not in self.order.split("-"):
            raise ParallelConfigError(f"{axis}={size} is > 1 but axis {axis!r} is missing from order={self.order!r}")

    @property
    def full_order(self) -> tuple[str, ...]:
        """``order`` with the axes it leaves out (all of size 1) appended, as Megatron-LM does."""
        tokens = self.order.split("-")
        return tuple(tokens + [a for a in ORDER_AXES if a not in tokens])
