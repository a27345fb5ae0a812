"""``ModelGroups``: the process groups a model chunk communicates over, taken from a ``ParallelState``."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from cp_ring import KERNEL_NAMES
from pstate import Group, ParallelState, as_group

from ..errors import TrainerError


@dataclass(frozen=True)
class ModelGroups:
    """Tensor (``tp``), context (``cp``), expert (``ep``) and expert-tensor (``etp``) parallel groups.

    ``sequence_parallel`` splits the activations between the TP regions along the sequence.
    ``cp_attention`` is ``"ring"`` (p2p, any head count), ``"ulysses"`` (all-to-all over heads) or
    ``"hierarchical"`` (all-to-all over heads in ``cp_a2a``, a group of adjacent CP ranks, and a ring over
    ``cp_ring``: ``cp_ring.hierarchical_attention``; both groups are needed then, with ``cp > 1``).
    ``tp_cp``: the TP x CP group (needed by :attr:`sequence_group` with both SP and CP).
    ``cp_kernel``: ring attention's block kernel by name (``cp_ring.make_kernel``).
    ``keep_gathered_input``: under sequence parallelism the column-parallel layers keep their gathered
    input for backward instead of gathering it again (``tp_layers.ColumnParallelLinear``).
    """

    tp: Group
    cp: Group
    ep: Group
    etp: Group
    sequence_parallel: bool = False
    cp_attention: str = "ring"
    tp_cp: Group | None = None
    cp_kernel: str = "auto"
    cp_a2a: Group | None = None
    cp_ring: Group | None = None
    keep_gathered_input: bool = False

    def __post_init__(self) -> None:
        if self.cp_attention not in ("ring", "ulysses", "hierarchical"):
            raise TrainerError(f"cp_attention={self.cp_attention!r}: must be 'ring', 'ulysses' or 'hierarchical'")
        if self.cp_attention == "hierarchical" and self.cp_size > 1 and (self.cp_a2a is None or self.cp_ring is None):
            raise TrainerError(
                "cp_attention='hierarchical' needs the cp_a2a and cp_ring groups (pstate makes them when "
                "ParallelConfig.cp_a2a > 1)"
            )
        if self.cp_kernel not in KERNEL_NAMES:
            raise TrainerError(f"cp_kernel={self.cp_kernel!r}: must be one of {KERNEL_NAMES}")
        if self.sequence_parallel and self.tp_size == 1:
            raise TrainerError("sequence_parallel=True needs tp > 1: it splits the sequence over the TP group")
        if self.keep_gathered_input and not self.sequence_parallel:
            raise TrainerError("keep_gathered_input=True needs sequence_parallel=True: only then is an input gathered")

    @classmethod
    def from_state(
        cls,
        ps: ParallelState,
        *,
        sequence_parallel: bool = False,
        cp_attention: str = "ring",
        cp_kernel: str = "auto",
        keep_gathered_input: bool = False,
    ) -> ModelGroups:
        return cls(
            ps.tp, ps.cp, ps.ep, ps.etp, sequence_parallel, cp_attention, ps.tp_cp, cp_kernel, ps.cp_a2a, ps.cp_ring,
            keep_gathered_input,
        )  # fmt: skip

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(as_group(self.tp))

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(as_group(self.tp))

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(as_group(self.cp))

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(as_group(self.cp))

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(as_group(self.ep))

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(as_group(self.ep))

    @property
    def etp_size(self) -> int:
        return dist.get_world_size(as_group(self.etp))

    @property
    def etp_rank(self) -> int:
        return dist.get_rank(as_group(self.etp))

    @property
    def sequence_group(self) -> Group | None:
        """The ranks that hold other tokens of the same sequences (TP under SP, and CP), or ``None``."""
        split_tp, split_cp = self.sequence_parallel, self.cp_size > 1
        if split_tp and split_cp:
            if self.tp_cp is None:
                raise TrainerError("ModelGroups: sequence parallelism with cp > 1 needs the tp_cp group")
            return self.tp_cp
        return self.tp if split_tp else self.cp if split_cp else None
