"""``initialize`` creates groups whose members really communicate, at world sizes 1, 2, 4 and 8."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import pstate
from pstate import ParallelConfig, ParallelConfigError, layout
from pstate.layout import AXIS_GROUPS, CP_SUBGROUPS, embedding_groups

CONFIGS = {
    1: [ParallelConfig()],
    2: [ParallelConfig(tp=2), ParallelConfig(pp=2), ParallelConfig(cp=2, ep=2)],
    4: [
        ParallelConfig(tp=2, pp=2),
        ParallelConfig(cp=2, ep=4),
        ParallelConfig(tp=2, ep=2, etp=1, order="tp-cp-ep-dp-pp"),
        ParallelConfig(cp=4, cp_a2a=2),
    ],
    8: [
        ParallelConfig(tp=2, pp=2, cp=2),
        ParallelConfig(tp=2, cp=4, cp_a2a=2),
        ParallelConfig(tp=2, pp=2, vpp=2, ep=2),
        ParallelConfig(tp=2, ep=4, etp=1),
        ParallelConfig(tp=2, pp=2, order="tp-pp-dp"),
    ],
}


def sum_over_every_axis(config):
    """On each rank: all_reduce the global rank over every group; report sums, members, stage answers."""
    with pstate.initialize(config) as state:
        report = {}
        for name in [*AXIS_GROUPS, "embedding", "world"]:
            axis = getattr(state, name)
            if axis is None:
                report[name] = None
                continue
            value = torch.tensor([dist.get_rank()], dtype=torch.int64)
            dist.all_reduce(value, group=axis.group)
            report[name] = (value.item(), axis.ranks, axis.rank, axis.size, dist.get_world_size(axis.group))
        stages = [state.stage(c) for c in range(config.vpp)]
        firsts = [state.is_first_stage(), *(state.is_first_stage(c) for c in range(config.vpp))]
        lasts = [state.is_last_stage(), *(state.is_last_stage(c) for c in range(config.vpp))]
        return report, stages, firsts, lasts, state.device.type


@pytest.mark.parametrize(
    ("world", "config"), [(w, c) for w, configs in CONFIGS.items() for c in configs], ids=lambda x: str(x)
)
def test_every_group_communicates_among_exactly_its_members(run_ranks, world, config):
    lay = layout(config, world)
    results = run_ranks(world, sum_over_every_axis, config)
    pp = config.pp
    for rank, (report, stages, firsts, lasts, device) in enumerate(results):
        assert device == "cpu"
        expected = {name: lay.group_of(rank, spec) for name, spec in AXIS_GROUPS.items()}
        expected["world"] = list(range(world))
        expected["embedding"] = next((g for g in embedding_groups(lay) if rank in g), None)
        if config.cp_a2a == 1:  # no hierarchical split: no sub-groups created
            expected.update(dict.fromkeys(CP_SUBGROUPS))
        for name, members in expected.items():
            if members is None:
                assert report[name] is None, name
                continue
            total, ranks, index, size, group_size = report[name]
            assert list(ranks) == members, name
            assert total == sum(members), name
            assert ranks[index] == rank and size == group_size == len(members), name
        pp_rank = lay.coords(rank)["pp"]
        assert stages == [c * pp + pp_rank for c in range(config.vpp)]
        assert firsts == [pp_rank == 0, *(s == 0 for s in stages)]
        assert lasts == [pp_rank == pp - 1, *(s == pp * config.vpp - 1 for s in stages)]


def embedding_membership(config):
    with pstate.initialize(config) as state:
        return None if state.embedding is None else list(state.embedding.ranks)


def test_embedding_group_joins_first_and_last_stage(run_ranks):
    got = run_ranks(8, embedding_membership, ParallelConfig(pp=4))  # dp=2: pipelines [0,2,4,6], [1,3,5,7]
    assert got == [[0, 6], [1, 7], None, None, None, None, [0, 6], [1, 7]]


def refuse_before_creating_groups(config):
    before = torch.distributed.distributed_c10d._world.group_count
    try:
        pstate.initialize(config)
    except ParallelConfigError as exc:
        return str(exc), torch.distributed.distributed_c10d._world.group_count - before
    return None, None


def test_bad_config_is_refused_on_every_rank_before_any_group(run_ranks):
    for message, created in run_ranks(4, refuse_before_creating_groups, ParallelConfig(tp=3)):
        assert message == "tp*cp*pp=3 (tp=3, cp=1, pp=1) does not divide world_size=4"
        assert created == 0


def destroy_twice_and_reinitialize():
    state = pstate.initialize(ParallelConfig(tp=2))
    state.destroy()
    state.destroy()  # idempotent
    registered = dist.distributed_c10d._world.pg_map
    assert state.tp.group not in registered and dist.group.WORLD in registered
    with pstate.initialize(ParallelConfig(tp=2)) as again:
        value = torch.ones(1)
        dist.all_reduce(value, group=again.tp.group)
    return value.item(), dist.is_initialized()


def test_destroy_is_idempotent_and_keeps_a_default_group_it_did_not_create(run_ranks):
    assert run_ranks(4, destroy_twice_and_reinitialize) == [(2.0, True)] * 4


def test_stage_query_rejects_unknown_chunk(run_ranks):
    assert run_ranks(2, stage_query_error) == ["chunk=2 is outside 0..vpp-1 (vpp=2)"] * 2


def stage_query_error():
    with pstate.initialize(ParallelConfig(pp=2, vpp=2)) as state:
        try:
            state.stage(2)
        except ParallelConfigError as exc:
            return str(exc)


def test_without_torchrun_or_default_group_the_error_says_what_to_do(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(ParallelConfigError, match="start with torchrun"):
        pstate.initialize(ParallelConfig())


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, pstate
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as state:
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t, group=state.dp.group)
        line = f"rank {state.rank} backend {dist.get_backend()} dp {list(state.dp.ranks)} sum {t.item()}"
    assert not dist.is_initialized()
    with open(f"{sys.argv[1]}/rank{state.rank}.txt", "w") as f:
        f.write(line)
    """
)


def test_initialize_from_torchrun_environment(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        str(script),
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(4)]
    assert lines == [
        "rank 0 backend gloo dp [0, 2] sum 4.0",
        "rank 1 backend gloo dp [1, 3] sum 6.0",
        "rank 2 backend gloo dp [0, 2] sum 4.0",
        "rank 3 backend gloo dp [1, 3] sum 6.0",
    ]


def unwrap_groups():
    with pstate.initialize(ParallelConfig(tp=2)) as state:
        from_axis = pstate.as_group(state.tp) is state.tp.group
        from_group = pstate.as_group(state.tp.group) is state.tp.group
        try:
            pstate.as_group(2)
        except TypeError as error:
            return from_axis, from_group, str(error)
        return from_axis, from_group, None


def test_as_group_takes_an_axis_or_a_process_group_and_nothing_else(run_ranks):
    for from_axis, from_group, message in run_ranks(2, unwrap_groups):
        assert from_axis and from_group
        assert message == "expected a pstate Axis or a torch.distributed ProcessGroup, got int"


def fail_on_one_rank():
    with pstate.initialize(ParallelConfig()):
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 broke inside the block")
        dist.recv(torch.zeros(1), src=1)  # what rank 0 waits for never comes
    return "ok"


def test_an_error_inside_the_block_surfaces_instead_of_hanging_in_the_exit_barrier(run_ranks):
    from pstate.testing import RankError

    with pytest.raises(RankError, match="rank 1 broke inside the block"):
        run_ranks(2, fail_on_one_rank)
