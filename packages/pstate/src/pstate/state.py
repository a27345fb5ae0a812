"""``initialize``: create every process group the packages use from one :class:`~pstate.Layout`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ParallelConfig
from .device import backend_for, default_device, device_for_backend
from .errors import ParallelConfigError
from .layout import AXIS_GROUPS, CP_SUBGROUPS, Layout, embedding_groups, layout


@dataclass(frozen=True)
class Axis:
    """One process group as this rank sees it: the group, the global ``ranks`` in it (in group-rank
    order), and this process's ``rank`` within it."""

    name: str
    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)


Group = Axis | dist.ProcessGroup
"""What a layer or function that communicates takes: a :class:`Axis` or a plain process group."""


def as_group(group: Group) -> dist.ProcessGroup:
    """The process group behind ``group`` (an :class:`Axis` or a process group), so that every package
    can take either."""
    if isinstance(group, Axis):
        return group.group
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"expected a pstate Axis or a torch.distributed ProcessGroup, got {type(group).__name__}")


class ParallelState:
    """The process groups of one layout, as :class:`Axis` objects. Create it with :func:`initialize`.

    Decoder axes: ``tp, cp, dp, pp`` and the combinations ``dp_cp`` (gradient reduction under context
    parallelism), ``tp_cp``, ``tp_dp``, ``tp_dp_cp`` and ``mp`` (tp+pp, model parallel), and the two
    sub-groups of ``cp`` for hierarchical context parallelism, ``cp_a2a`` (adjacent CP ranks) and
    ``cp_ring`` (see :mod:`pstate.layout`; both ``None`` when ``config.cp_a2a == 1``, so that a run without
    the split creates no extra groups). Expert axes:
    ``etp, ep, edp, etp_ep, etp_ep_pp``. HSDP (``config.dp_shard``): ``dp_shard`` (a slice of ``dp_cp``
    that ZeRO-3 shards over; ``dp_cp`` itself without HSDP) and ``dp_replicate`` (across the shard groups;
    ``None`` without HSDP). ``embedding`` joins the first and last pipeline stage (``None``
    on ranks that hold neither). ``world`` is the default group.
    """

    tp: Axis
    cp: Axis
    cp_a2a: Axis | None
    cp_ring: Axis | None
    dp: Axis
    pp: Axis
    dp_cp: Axis
    tp_cp: Axis
    tp_dp: Axis
    tp_dp_cp: Axis
    mp: Axis
    etp: Axis
    ep: Axis
    edp: Axis
    etp_ep: Axis
    etp_ep_pp: Axis
    dp_shard: Axis
    dp_replicate: Axis | None
    embedding: Axis | None
    world: Axis

    def __init__(
        self,
        lay: Layout,
        *,
        device: torch.device,
        owns_default_group: bool,
        timeout: timedelta,
        local_groups: bool = False,
    ):
        self.layout = lay
        self.config = lay.config
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = lay.world_size
        self._owns_default_group = owns_default_group
        self._created: list[dist.ProcessGroup] = []
        self._destroyed = False
        self.embedding = None  # stays None on ranks that hold neither pipeline end
        self.cp_a2a = self.cp_ring = None  # stay None without a hierarchical CP split
        by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {tuple(range(lay.world_size)): dist.group.WORLD}
        split_cp = lay.config.cp_a2a > 1
        specs = [(n, spec) for n, spec in AXIS_GROUPS.items() if split_cp or n not in CP_SUBGROUPS]
        if local_groups:  # only this rank's groups: the cost follows what this rank holds, not the world
            axes = [(name, [lay.group_of(self.rank, spec)]) for name, spec in specs]
            pipeline = lay.group_of(self.rank, "pp")
            axes.append(("embedding", [sorted({pipeline[0], pipeline[-1]})]))
        else:
            axes = [(name, lay.groups(spec)) for name, spec in specs]
            axes.append(("embedding", embedding_groups(lay)))
        if lay.dp_replicate > 1:  # HSDP: the dp_cp groups split into shard and replicate groups
            split = [[g] for g in lay.hsdp_group_of(self.rank)] if local_groups else lay.hsdp_groups()
            axes += zip(("dp_shard", "dp_replicate"), split)
        # Every rank creates every distinct group in the same order (new_group is collective), or, with
        # local_groups, only its own with a barrier among their members (torch's use_local_synchronization).
        extra = {"use_local_synchronization": True} if local_groups else {}
        for name, groups in axes:
            for ranks in map(tuple, groups):
                if ranks not in by_ranks and (not local_groups or self.rank in ranks):
                    group = dist.new_group(list(ranks), timeout=timeout, **extra)
                    by_ranks[ranks] = group
                    if self.rank in ranks:
                        self._created.append(group)
                if self.rank in ranks:
                    setattr(self, name, Axis(name, by_ranks[ranks], ranks, ranks.index(self.rank)))
        self.world = Axis("world", dist.group.WORLD, tuple(range(lay.world_size)), self.rank)
        if lay.dp_replicate == 1:  # no HSDP: ZeRO-3 shards over all of dp_cp
            self.dp_shard = Axis("dp_shard", self.dp_cp.group, self.dp_cp.ranks, self.dp_cp.rank)
            self.dp_replicate = None

    # -- pipeline stage queries (looped placement: chunk c of pipeline rank r is stage c*pp + r) --

    @property
    def num_stages(self) -> int:
        """Pipeline stages in all: ``pp * vpp``."""
        return self.config.pp * self.config.vpp

    def stage(self, chunk: int = 0) -> int:
        """The global pipeline stage that virtual chunk ``chunk`` of this rank holds."""
        if not 0 <= chunk < self.config.vpp:
            raise ParallelConfigError(f"chunk={chunk} is outside 0..vpp-1 (vpp={self.config.vpp})")
        return chunk * self.config.pp + self.pp.rank

    def is_first_stage(self, chunk: int | None = None) -> bool:
        """Whether this rank holds the first stage (``chunk=None``), or whether chunk ``chunk`` is it."""
        return self.pp.rank == 0 if chunk is None else self.stage(chunk) == 0

    def is_last_stage(self, chunk: int | None = None) -> bool:
        """Whether this rank holds the last stage (``chunk=None``), or whether chunk ``chunk`` is it."""
        if chunk is None:
            return self.pp.rank == self.config.pp - 1
        return self.stage(chunk) == self.num_stages - 1

    # -- lifetime --

    def destroy(self, *, barrier: bool = True) -> None:
        """Destroy the groups this state created (and the default group if :func:`initialize` made it).

        The barrier first keeps a fast rank from tearing down groups a slow one still uses; it is skipped
        when leaving a ``with`` block on an exception, since the other ranks may never reach it and the
        error must surface rather than hang.
        """
        if self._destroyed:
            return
        self._destroyed = True
        if barrier:
            dist.barrier()
        for group in self._created:
            dist.destroy_process_group(group)
        self._created.clear()
        if self._owns_default_group:
            dist.destroy_process_group()

    def __enter__(self) -> ParallelState:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.destroy(barrier=exc_type is None)

    def __repr__(self) -> str:
        coords = ", ".join(f"{k}={v}" for k, v in self.layout.coords(self.rank).items())
        return f"ParallelState(rank={self.rank}/{self.world_size}, {coords})"


def initialize(
    config: ParallelConfig,
    *,
    device: torch.device | str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    local_groups: bool | None = None,
) -> ParallelState:
    """Create every process group of ``config`` and return them as a :class:`ParallelState`.

    Uses the default process group if one exists; otherwise creates it from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with the backend that suits ``device``
    (NCCL on CUDA, gloo on CPU; by default the GPU of ``LOCAL_RANK`` if there is one). The config is
    validated against the world size before any group is created.

    ``local_groups``: create only the groups that hold this rank (``new_group`` with
    ``use_local_synchronization``), so setup costs what the rank holds rather than the world's group count.
    Default: only under PyTorch's ``fake`` backend (dry runs), where no other rank exists to call it.
    """
    if dist.is_initialized():
        lay = layout(config, dist.get_world_size())
        backend = dist.get_backend()
        resolved = torch.device(device) if device is not None else device_for_backend(backend)
        local = backend == "fake" if local_groups is None else local_groups
        return ParallelState(lay, device=resolved, owns_default_group=False, timeout=timeout, local_groups=local)
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ParallelConfigError(
            f"no default process group and {', '.join(missing)} not set: start with torchrun, "
            "or call torch.distributed.init_process_group first"
        )
    lay = layout(config, int(os.environ["WORLD_SIZE"]))
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type != "cpu":
        torch.cuda.set_device(resolved)
    dist.init_process_group(backend_for(resolved), timeout=timeout)
    local = bool(local_groups)
    return ParallelState(lay, device=resolved, owns_default_group=True, timeout=timeout, local_groups=local)
