"""The rank grid: which global ranks form each parallel group. Pure: no processes, no torch.

Ranks are laid out as in Megatron-LM's rank generator, so a user moving from Megatron keeps the same
placement. The axes of ``config.order`` form a mixed-radix number whose first digit varies fastest:
``rank = sum(coord[a] * stride[a])``. A group for a set of axes is the set of ranks that differ only on
those axes, listed with the first axis of ``order`` varying fastest.

Two grids share the world. The *decoder* grid (``tp, cp, dp, pp``; ``ep`` is 1 there) places attention
and dense layers; the *expert* grid (``etp, ep, edp, pp``; ``cp`` is 1 there) places MoE experts, with
``edp = world / (etp * ep * pp)``. Both use the same ``order`` (``etp`` sits where ``tp`` is, ``edp``
where ``dp`` is), and their pipeline groups must agree.

Hierarchical context parallelism cuts each CP group (listed in CP-rank order) into the two sub-groups
``cp_a2a`` (``config.cp_a2a`` adjacent CP ranks: CP ranks ``j*a .. j*a+a-1``) and ``cp_ring`` (the CP
ranks equal modulo ``a``), so that CP rank ``c`` is rank ``c % a`` of its ``cp_a2a`` group and rank
``c // a`` of its ``cp_ring`` group. With the CP axis placed early in ``order`` the inner groups are near
ranks (the same node), and only the rings cross nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .config import ParallelConfig
from .errors import ParallelConfigError

DECODER_AXES = ("tp", "cp", "dp", "pp")
EXPERT_AXES = ("etp", "ep", "edp", "pp")
#: Every coordinate :meth:`Layout.coords` reports, in this order.
ALL_AXES = ("tp", "cp", "dp", "pp", "etp", "ep", "edp")
#: Attribute of ``ParallelState`` -> the ``Layout.groups`` axes it is made of.
AXIS_GROUPS = {
    "tp": "tp",
    "cp": "cp",
    "cp_a2a": "cp_a2a",
    "cp_ring": "cp_ring",
    "dp": "dp",
    "pp": "pp",
    "dp_cp": "cp-dp",
    "tp_cp": "tp-cp",
    "tp_dp": "tp-dp",
    "tp_dp_cp": "tp-cp-dp",
    "mp": "tp-pp",
    "etp": "etp",
    "ep": "ep",
    "edp": "edp",
    "etp_ep": "etp-ep",
    "etp_ep_pp": "etp-ep-pp",
}
#: The sub-groups of each CP group for hierarchical context parallelism (see the module notes).
CP_SUBGROUPS = ("cp_a2a", "cp_ring")
#: Expert axis names as the order string spells them.
_EXPERT_TO_ORDER = {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"}


@dataclass(frozen=True)
class Layout:
    """The validated rank grid for one ``ParallelConfig`` and world size. Build it with :func:`layout`."""

    config: ParallelConfig
    world_size: int
    dp: int
    edp: int

    @property
    def sizes(self) -> dict[str, int]:
        """The size of every axis, decoder and expert, by name."""
        c = self.config
        return {"tp": c.tp, "cp": c.cp, "dp": self.dp, "pp": c.pp, "etp": c.etp, "ep": c.ep, "edp": self.edp}

    def _grid(self, expert: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The order-string axis names and their sizes, fastest first, for one of the two grids."""
        s = self.sizes
        if expert:
            by_token = {"tp": s["etp"], "cp": 1, "ep": s["ep"], "dp": s["edp"], "pp": s["pp"]}
        else:
            by_token = {"tp": s["tp"], "cp": s["cp"], "ep": 1, "dp": s["dp"], "pp": s["pp"]}
        tokens = self.config.full_order
        return tokens, tuple(by_token[t] for t in tokens)

    def groups(self, axes: str) -> list[list[int]]:
        """Every group of ``axes``, a ``-``-joined subset of ``tp, cp, dp, pp`` (decoder grid; ``ep`` is
        1 there) or of ``etp, ep, edp, pp`` (expert grid), or one of ``cp_a2a``, ``cp_ring`` (the sub-groups
        of each CP group, see the module notes). Each group lists global ranks."""
        if axes in CP_SUBGROUPS:
            return self._cp_subgroups(axes).tolist()
        return self._group_array(*_parse_axes(axes)).tolist()

    def _cp_subgroups(self, which: str) -> np.ndarray:
        """The ``cp_a2a`` or ``cp_ring`` groups, one per row: each CP group cut into ``cp/a`` rows of ``a``."""
        a = self.config.cp_a2a
        cp_groups = self._group_array(frozenset({"cp"}), expert=False)
        blocks = cp_groups.reshape(cp_groups.shape[0], -1, a)  # [cp group, inner group j, inner rank i]
        if which == "cp_a2a":
            return blocks.reshape(-1, a)
        return blocks.transpose(0, 2, 1).reshape(-1, blocks.shape[1])

    def group_of(self, rank: int, axes: str) -> list[int]:
        """The group of ``axes`` that holds ``rank``, in rank order; costs the group's size, not the world's."""
        self._check_rank(rank)
        if axes in CP_SUBGROUPS:
            cp_group, a = self.group_of(rank, "cp"), self.config.cp_a2a
            c = cp_group.index(rank)
            return cp_group[c - c % a : c - c % a + a] if axes == "cp_a2a" else cp_group[c % a :: a]
        masked, expert = _parse_axes(axes)
        tokens, sizes = self._grid(expert)
        members = [rank]
        stride = 1
        for token, size in zip(tokens, sizes):
            if token in masked:
                base = [m - ((m // stride) % size) * stride for m in members]
                members = [b + k * stride for k in range(size) for b in base]
            stride *= size
        return sorted(members)

    def coords(self, rank: int) -> dict[str, int]:
        """``rank``'s index on every axis (``tp, cp, dp, pp, etp, ep, edp``); it is also the rank's
        position in its group of that axis."""
        self._check_rank(rank)
        out: dict[str, int] = {}
        expert_names = {token: name for name, token in _EXPERT_TO_ORDER.items() if name != "pp"}
        for expert, names in ((False, {t: t for t in DECODER_AXES}), (True, expert_names)):
            tokens, sizes = self._grid(expert)
            stride = 1
            for token, size in zip(tokens, sizes):
                if token in names:
                    out[names[token]] = (rank // stride) % size
                stride *= size
        return {name: out[name] for name in ALL_AXES}

    @property
    def dp_shard(self) -> int:
        """HSDP: data-parallel ranks per shard group (``config.dp_shard``, default all of ``dp``)."""
        return self.config.dp_shard or self.dp

    @property
    def dp_replicate(self) -> int:
        """HSDP: shard groups each parameter shard is replicated over (1: no HSDP)."""
        return self.dp // self.dp_shard

    def hsdp_groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """The HSDP split of every ``cp-dp`` group: shard groups (``dp_shard`` adjacent dp coordinates with
        all of their CP ranks) and replicate groups (one rank of each shard group: the same CP coordinate
        and the same place in its block). Both are slices of the one grid, listed in rank order."""
        shard: list[list[int]] = []
        replicate: list[list[int]] = []
        for group in self.groups("cp-dp"):
            s, r = self._split_dp(group)
            shard += s
            replicate += r
        return shard, replicate

    def hsdp_group_of(self, rank: int) -> tuple[list[int], list[int]]:
        """The shard group and the replicate group that hold ``rank`` (see :meth:`hsdp_groups`)."""
        shard, replicate = self._split_dp(self.group_of(rank, "cp-dp"))
        return next(g for g in shard if rank in g), next(g for g in replicate if rank in g)

    def _split_dp(self, group: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        shard: dict[int, list[int]] = {}
        replicate: dict[tuple[int, int], list[int]] = {}
        for member in sorted(group):
            c = self.coords(member)
            block, place = divmod(c["dp"], self.dp_shard)
            shard.setdefault(block, []).append(member)
            replicate.setdefault((c["cp"], place), []).append(member)
        return list(shard.values()), list(replicate.values())

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank={rank} is outside world_size={self.world_size}")

    def _group_array(self, masked: frozenset[str], expert: bool) -> np.ndarray:
        """Groups of the order-string axes ``masked`` in one grid, one group per row."""
        tokens, sizes = self._grid(expert)
        n = len(tokens)
        # Axis i of the order (i=0 fastest) is dimension n-1-i of a C-ordered array of all ranks.
        ranks = np.arange(self.world_size).reshape(sizes[::-1])
        outer = [n - 1 - i for i in reversed(range(n)) if tokens[i] not in masked]
        inner = [n - 1 - i for i in reversed(range(n)) if tokens[i] in masked]
        group_size = prod(sizes[i] for i in range(n) if tokens[i] in masked)
        return ranks.transpose(outer + inner).reshape(-1, group_size)


def _parse_axes(axes: str) -> tuple[frozenset[str], bool]:
    """Map an ``axes`` string to (order-string axis names, whether it is the expert grid)."""
    names = axes.lower().split("-")
    if any(n not in DECODER_AXES + EXPERT_AXES for n in names) or len(set(names)) != len(names):
        raise ParallelConfigError(
            f"axes={axes!r}: expected a '-'-joined subset of {'-'.join(DECODER_AXES)} "
            f"or of {'-'.join(EXPERT_AXES)}, each axis at most once"
        )
    expert = any(n in ("etp", "ep", "edp") for n in names)
    if expert and any(n in ("tp", "cp", "dp") for n in names):
        raise ParallelConfigError(
            f"axes={axes!r} mixes decoder axes (tp, cp, dp) with expert axes (etp, ep, edp); "
            "expert groups live in their own grid: use etp, ep, edp and pp"
        )
    return frozenset(_EXPERT_TO_ORDER[n] for n in names) if expert else frozenset(names), expert


def layout(config: ParallelConfig, world_size: int) -> Layout:
    """Validate ``config`` against ``world_size`` and return the rank grid. Pure: no processes."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ParallelConfigError(f"world_size={world_size!r} must be an integer >= 1")
    c = config
    model = c.tp * c.cp * c.pp
    if c.dp is None:
        if world_size % model:
            raise ParallelConfigError(
                f"tp*cp*pp={model} (tp={c.tp}, cp={c.cp}, pp={c.pp}) does not divide world_size={world_size}"
            )
        dp = world_size // model
        c.require_in_order("dp", dp)
    elif model * c.dp != world_size:
        raise ParallelConfigError(
            f"dp={c.dp} is inconsistent: tp*cp*dp*pp={model * c.dp} (tp={c.tp}, cp={c.cp}, pp={c.pp}) "
            f"must equal world_size={world_size}"
        )
    else:
        dp = c.dp
    expert_model = c.etp * c.ep * c.pp
    if world_size % expert_model:
        raise ParallelConfigError(
            f"etp*ep*pp={expert_model} (etp={c.etp}, ep={c.ep}, pp={c.pp}) does not divide world_size={world_size}"
        )
    if c.dp_shard is not None and dp % c.dp_shard:
        raise ParallelConfigError(
            f"dp_shard={c.dp_shard} must divide dp={dp} (HSDP: shard groups of dp_shard adjacent data-parallel "
            "ranks, replicated across dp/dp_shard groups)"
        )
    edp = world_size // expert_model
    if edp > 1 and "dp" not in c.order.split("-"):
        raise ParallelConfigError(
            f"edp={edp} is > 1 but axis 'dp' (where edp is placed) is missing from order={c.order!r}"
        )
    result = Layout(config=c, world_size=world_size, dp=dp, edp=edp)
    pp = frozenset({"pp"})
    if not np.array_equal(result._group_array(pp, expert=False), result._group_array(pp, expert=True)):
        raise ParallelConfigError(
            f"order={c.order!r} gives different pipeline groups in the decoder grid and the expert grid "
            f"(tp={c.tp}, cp={c.cp}, dp={dp} vs etp={c.etp}, ep={c.ep}, edp={edp}); "
            "place 'pp' after the axes whose sizes differ between the two grids"
        )
    return result


def embedding_groups(lay: Layout) -> list[list[int]]:
    """The first and last rank of every pipeline group: the stages that hold the (tied) embedding."""
    return [sorted({g[0], g[-1]}) for g in lay.groups("pp")]
