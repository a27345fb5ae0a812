"""The rank grid: hand-worked groups, an independent mixed-radix reference over every order, properties."""

import itertools
from math import prod

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pstate import ParallelConfig, ParallelConfigError, layout
from pstate.config import ORDER_AXES


@pytest.mark.parametrize(
    ("kwargs", "world", "expected"),
    [
        # Megatron-LM's documented example: 16 GPUs, tp=2, pp=4 -> dp=2.
        (
            {"tp": 2, "pp": 4},
            16,
            {
                "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
                "pp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
                "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
                "tp-pp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            },
        ),
        (
            {"tp": 2, "cp": 2},
            8,
            {
                "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
                "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
                "cp-dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
                "dp-cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
                "tp-cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            },
        ),
        (
            {"tp": 2, "ep": 2},
            8,
            {
                "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
                "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
                "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
                "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
                "etp-ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
            },
        ),
        (
            {"tp": 2, "etp": 1, "ep": 4},
            8,
            {
                "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
                "etp": [[0], [1], [2], [3], [4], [5], [6], [7]],
                "ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
                "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            },
        ),
        (
            {"tp": 2, "pp": 2, "order": "tp-pp-dp"},
            8,
            {
                "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
                "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
                "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            },
        ),
        ({"tp": 2, "order": "dp-tp"}, 4, {"dp": [[0, 1], [2, 3]], "tp": [[0, 2], [1, 3]]}),
        ({}, 1, {"tp": [[0]], "tp-cp-dp-pp": [[0]], "etp-ep-edp-pp": [[0]]}),
    ],
)
def test_hand_worked_groups(kwargs, world, expected):
    lay = layout(ParallelConfig(**kwargs), world)
    for axes, groups in expected.items():
        assert lay.groups(axes) == groups, axes


def test_coords_hand_worked():
    lay = layout(ParallelConfig(tp=2, ep=2), 8)
    assert lay.coords(5) == {"tp": 1, "cp": 0, "dp": 2, "pp": 0, "etp": 1, "ep": 0, "edp": 1}
    assert lay.sizes == {"tp": 2, "cp": 1, "dp": 4, "pp": 1, "etp": 2, "ep": 2, "edp": 2}


def reference_groups(world: int, tokens: list[str], sizes: dict[str, int], masked: set[str]) -> list[list[int]]:
    """Megatron's rank generator as plain loops: a mixed-radix number over ``tokens`` (first fastest);
    a group varies the masked digits, groups are enumerated over the other digits, first fastest."""
    dims = [sizes[t] for t in tokens]
    strides = [prod(dims[:i]) for i in range(len(dims))]
    inner = [i for i, t in enumerate(tokens) if t in masked]
    outer = [i for i, t in enumerate(tokens) if t not in masked]

    def number(index: int, digits: list[int]) -> int:
        value = 0
        for i in digits:
            value += (index % dims[i]) * strides[i]
            index //= dims[i]
        return value

    size = prod(dims[i] for i in inner)
    return [[number(g, outer) + number(k, inner) for k in range(size)] for g in range(world // size)]


def all_subsets(names):
    return [c for n in range(1, len(names) + 1) for c in itertools.combinations(names, n)]


@pytest.mark.parametrize("order", ["-".join(p) for p in itertools.permutations(ORDER_AXES)])
def test_every_order_matches_the_reference(order):
    for tp, cp, pp, ep, etp, world in [
        (2, 1, 2, 2, 1, 8),
        (2, 2, 2, 2, 2, 16),
        (3, 1, 2, 2, 1, 12),
        (1, 2, 3, 4, 1, 24),
    ]:
        config = ParallelConfig(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
        dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
        decoder = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
        expert = {"tp": etp, "cp": 1, "ep": ep, "dp": edp, "pp": pp}
        tokens = order.split("-")
        if reference_groups(world, tokens, decoder, {"pp"}) != reference_groups(world, tokens, expert, {"pp"}):
            with pytest.raises(ParallelConfigError, match="different pipeline groups"):
                layout(config, world)
            continue
        lay = layout(config, world)
        for subset in all_subsets(["tp", "cp", "dp", "pp"]):
            assert lay.groups("-".join(subset)) == reference_groups(world, tokens, decoder, set(subset)), subset
        rename = {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"}
        for subset in all_subsets(["etp", "ep", "edp", "pp"]):
            want = reference_groups(world, tokens, expert, {rename[a] for a in subset})
            assert lay.groups("-".join(subset)) == want, subset


@st.composite
def layouts(draw):
    sizes = {a: draw(st.sampled_from([1, 1, 2, 3, 4])) for a in ("tp", "cp", "pp", "dp")}
    etp = draw(st.sampled_from([1, sizes["tp"]]))
    world = prod(sizes.values())
    ep_choices = [e for e in (1, 2, 3, 4) if world % (etp * e * sizes["pp"]) == 0]
    ep = draw(st.sampled_from(ep_choices))
    order = "-".join(draw(st.permutations(ORDER_AXES)))
    config = ParallelConfig(tp=sizes["tp"], cp=sizes["cp"], pp=sizes["pp"], ep=ep, etp=etp, order=order)
    try:
        return layout(config, world)
    except ParallelConfigError as exc:
        assert "different pipeline groups" in str(exc)
        return layout(ParallelConfig(tp=sizes["tp"], cp=sizes["cp"], pp=sizes["pp"], ep=ep, etp=etp), world)


GRIDS = (("tp", "cp", "dp", "pp"), ("etp", "ep", "edp", "pp"))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_grid_properties(lay):
    sizes = lay.sizes
    everyone = list(range(lay.world_size))
    for axes in GRIDS:
        assert prod(sizes[a] for a in axes) == lay.world_size
        for subset in all_subsets(axes):
            spec = "-".join(subset)
            groups = lay.groups(spec)
            # Each set of axes partitions the world into groups of the product of their sizes.
            assert sorted(r for g in groups for r in g) == everyone
            assert all(len(g) == prod(sizes[a] for a in subset) for g in groups)
        for rank in everyone:
            coords = lay.coords(rank)
            for a in axes:
                group = lay.group_of(rank, a)
                # A rank's coordinate on an axis is its position in its group of that axis ...
                assert group[coords[a]] == rank
                # ... and the members differ from it on that axis only.
                for member in group:
                    other = lay.coords(member)
                    assert all(other[b] == coords[b] for b in axes if b != a)
            for a, b in itertools.combinations(axes, 2):
                # Groups of different axes through a rank meet in exactly that rank.
                assert set(lay.group_of(rank, a)) & set(lay.group_of(rank, b)) == {rank}
                pair = {y for x in lay.group_of(rank, a) for y in lay.group_of(x, b)}
                assert set(lay.group_of(rank, f"{a}-{b}")) == pair
    # The pipeline placement is shared by the two grids: a decoder pipeline group keeps expert coords.
    for rank in everyone:
        coords = lay.coords(rank)
        for member in lay.group_of(rank, "pp"):
            assert all(lay.coords(member)[a] == coords[a] for a in ("etp", "ep", "edp"))


def test_large_world_is_computed_without_per_rank_python_loops():
    lay = layout(ParallelConfig(tp=8, cp=2, pp=8, ep=8, etp=2, vpp=4), 16384)
    assert lay.sizes == {"tp": 8, "cp": 2, "dp": 128, "pp": 8, "etp": 2, "ep": 8, "edp": 128}
    dp = lay.groups("dp")
    assert len(dp) == 128 and dp[0][:3] == [0, 16, 32]
    assert lay.group_of(16383, "pp") == [16383 - 2048 * k for k in range(7, -1, -1)]


def test_hierarchical_cp_subgroups_hand_worked():
    """tp=2, cp=4, cp_a2a=2 on 16 ranks: CP groups [0,2,4,6] ...; inner groups are adjacent CP ranks."""
    lay = layout(ParallelConfig(tp=2, cp=4, cp_a2a=2), 16)
    assert lay.groups("cp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay.groups("cp_a2a")[:4] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert lay.groups("cp_ring")[:4] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert layout(ParallelConfig(cp=4), 4).groups("cp_a2a") == [[0], [1], [2], [3]]
    assert layout(ParallelConfig(cp=4), 4).groups("cp_ring") == [[0, 1, 2, 3]]


@pytest.mark.parametrize("a", [1, 2, 4, 8])
def test_cp_subgroups_cut_each_cp_group_by_cp_rank(a):
    """For every rank: CP rank c is rank c % a of its cp_a2a group and rank c // a of its cp_ring group, and
    ``group_of`` agrees with ``groups``."""
    lay = layout(ParallelConfig(tp=2, cp=8, cp_a2a=a, pp=2), 64)
    for which in ("cp_a2a", "cp_ring"):
        groups = lay.groups(which)
        assert sorted(r for g in groups for r in g) == list(range(64))
        assert all(lay.group_of(g[0], which) == g for g in groups)
    for rank in range(64):
        c, cp_group = lay.coords(rank)["cp"], lay.group_of(rank, "cp")
        inner, ring = lay.group_of(rank, "cp_a2a"), lay.group_of(rank, "cp_ring")
        assert inner.index(rank) == c % a and ring.index(rank) == c // a
        assert inner == cp_group[c - c % a : c - c % a + a] and set(inner) & set(ring) == {rank}


def test_cp_subgroups_of_a_large_world():
    lay = layout(ParallelConfig(tp=8, cp=8, cp_a2a=4, pp=8), 16384)
    inner, ring = lay.groups("cp_a2a"), lay.groups("cp_ring")
    assert len(inner) == 4096 and inner[0] == [0, 8, 16, 24] and ring[0] == [0, 32]
