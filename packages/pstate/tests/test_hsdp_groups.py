"""HSDP's split of the data-parallel group: shard groups of ``dp_shard`` adjacent dp ranks (with their CP
ranks) and replicate groups across them, both slices of the one grid; refused when dp_shard does not
divide dp; and the groups ``initialize`` creates communicate among exactly those members."""

import pytest
import torch
import torch.distributed as dist

import pstate
from pstate import ParallelConfig, ParallelConfigError, layout


@pytest.mark.parametrize(
    "config",
    [
        ParallelConfig(dp_shard=2),
        ParallelConfig(dp_shard=4),
        ParallelConfig(dp_shard=1),
        ParallelConfig(tp=2, dp_shard=2),
        ParallelConfig(cp=2, dp_shard=2),
        ParallelConfig(pp=2, dp_shard=2, order="tp-pp-dp"),
    ],
    ids=str,
)
def test_shard_and_replicate_groups_tile_each_dp_cp_group(config):
    lay = layout(config, 8)
    shard, replicate = lay.hsdp_groups()
    cp = config.cp
    assert all(len(g) == lay.dp_shard * cp for g in shard)
    assert all(len(g) == lay.dp_replicate for g in replicate)
    for rank in range(8):
        dp_cp = set(lay.group_of(rank, "cp-dp"))
        s, r = lay.hsdp_group_of(rank)
        assert s in shard and r in replicate and rank in s and rank in r
        assert set(s) <= dp_cp and set(r) <= dp_cp and set(s) & set(r) == {rank}
        c = lay.coords(rank)
        # shard group: the block of adjacent dp coordinates; replicate: the same cp and place in the block
        assert {lay.coords(m)["dp"] // lay.dp_shard for m in s} == {c["dp"] // lay.dp_shard}
        assert {(lay.coords(m)["cp"], lay.coords(m)["dp"] % lay.dp_shard) for m in r} == {
            (c["cp"], c["dp"] % lay.dp_shard)
        }
        assert len(s) * len(r) == len(dp_cp)


def test_hsdp_2x2_at_world_4_places_shards_on_adjacent_ranks():
    lay = layout(ParallelConfig(dp_shard=2), 4)
    assert lay.hsdp_groups() == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert (lay.dp_shard, lay.dp_replicate) == (2, 2)
    assert layout(ParallelConfig(), 4).dp_replicate == 1


def test_dp_shard_that_does_not_divide_dp_is_refused_in_one_line():
    with pytest.raises(ParallelConfigError, match=r"^dp_shard=3 must divide dp=4 \(HSDP"):
        layout(ParallelConfig(dp_shard=3), 4)
    with pytest.raises(ParallelConfigError, match="dp_shard=0 must be >= 1"):
        ParallelConfig(dp_shard=0)


def sum_over_hsdp_groups(config):
    with pstate.initialize(config) as state:
        out = {}
        for name in ("dp_shard", "dp_replicate"):
            axis = getattr(state, name)
            if axis is None:
                out[name] = None
                continue
            value = torch.tensor([dist.get_rank()])
            dist.all_reduce(value, group=axis.group)
            out[name] = (list(axis.ranks), value.item(), axis.rank)
        return out


@pytest.mark.parametrize("config", [ParallelConfig(cp=2, dp_shard=2), ParallelConfig()], ids=str)
def test_initialize_creates_groups_that_communicate_among_their_members(run_ranks, config):
    lay = layout(config, 8)
    for rank, got in enumerate(run_ranks(8, sum_over_hsdp_groups, config)):
        if lay.dp_replicate == 1:  # no HSDP: dp_shard is dp_cp, no replicate group
            assert got["dp_replicate"] is None
            assert got["dp_shard"][0] == lay.group_of(rank, "cp-dp")
            continue
        for name, members in zip(("dp_shard", "dp_replicate"), lay.hsdp_group_of(rank)):
            ranks, total, index = got[name]
            assert ranks == members and total == sum(members) and ranks[index] == rank
