"""pstate places ranks exactly as megatron-core's own RankGenerator does, for every order string.

megatron-core (a dev dependency only, pure Python on CPU) is the reference; a user moving from
Megatron-LM keeps the same placement of every decoder and expert group.
"""

import itertools
import warnings

import pytest

from pstate import ParallelConfig, ParallelConfigError, layout
from pstate.config import ORDER_AXES

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.parallel_state import RankGenerator

SIZES = [  # tp, cp, pp, ep, etp, world
    (2, 1, 2, 2, 1, 8),
    (2, 2, 2, 2, 2, 16),
    (1, 2, 2, 4, 1, 16),
    (4, 1, 2, 2, 2, 32),
    (2, 2, 1, 4, 1, 8),
    (3, 1, 2, 2, 1, 12),
]
DECODER = {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp"}
EXPERT = {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"}


def subsets(names):
    return [c for n in range(1, len(names) + 1) for c in itertools.combinations(names, n)]


@pytest.mark.parametrize("order", ["-".join(p) for p in itertools.permutations(ORDER_AXES)])
def test_same_groups_as_megatron_core(order):
    for tp, cp, pp, ep, etp, world in SIZES:
        dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
        decoder = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
        expert = RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
        config = ParallelConfig(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
        if decoder.get_ranks("pp") != expert.get_ranks("pp"):  # Megatron asserts on this too
            with pytest.raises(ParallelConfigError, match="different pipeline groups"):
                layout(config, world)
            continue
        lay = layout(config, world)
        for grid, generator in ((DECODER, decoder), (EXPERT, expert)):
            for subset in subsets(list(grid)):
                ours = lay.groups("-".join(subset))
                theirs = generator.get_ranks("-".join(grid[a] for a in subset))
                assert ours == theirs, (order, (tp, cp, pp, ep, etp, world), subset)


@pytest.mark.parametrize(("tp", "cp", "a", "world"), [(1, 4, 2, 4), (2, 4, 2, 16), (2, 8, 2, 16), (1, 8, 4, 16)])
def test_hierarchical_cp_groups_are_megatron_cores(monkeypatch, tp, cp, a, world):
    """``cp_a2a`` / ``cp_ring`` are the two levels megatron-core's ``create_hierarchical_groups`` cuts each CP
    group into for ``hierarchical_context_parallel_sizes=[a, cp // a]`` (its ``a2a+p2p``: level 0 is the
    all-to-all group, level 1 the ring). Its group constructor is replaced by one that records the ranks."""
    import megatron.core.parallel_state as mps

    pytest.importorskip("einops")
    made = []
    monkeypatch.setattr(mps, "create_group", lambda ranks, **kwargs: made.append(list(ranks)))
    lay = layout(ParallelConfig(tp=tp, cp=cp, cp_a2a=a), world)
    inner, outer = [], []
    for cp_group in lay.groups("cp"):
        made.clear()
        mps.create_hierarchical_groups(cp_group[0], cp_group, [a, cp // a])
        inner += made[: cp // a]
        outer += made[cp // a :]
    assert sorted(lay.groups("cp_a2a")) == sorted(inner)
    assert sorted(lay.groups("cp_ring")) == sorted(outer)
