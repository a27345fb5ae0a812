"""``build``: the shape of every schedule, Megatron's orders, and every refused combination."""

from collections import Counter

import pytest

from pp_sched import SCHEDULES, Action, PipelineScheduleError, Schedule, build, validate


def grid():
    """Every valid (name, pp, microbatches, vpp) of a grid, microbatch counts below and above pp."""
    for pp in range(1, 9):
        for m in (1, 2, 3, pp - 1, pp, pp + 1, 2 * pp, 2 * pp + 3, 4 * pp):
            if m < 1:
                continue
            for name in ("gpipe", "1f1b", "zero-bubble"):
                yield name, pp, m, 1
            if pp > 1 and m % pp == 0:
                for vpp in (2, 3, 4):
                    yield "interleaved-1f1b", pp, m, vpp


GRID = sorted(set(grid()))


@pytest.mark.parametrize(("name", "pp", "m", "vpp"), GRID)
def test_every_microbatch_passes_every_stage_forward_then_backward_once(name, pp, m, vpp):
    schedule = build(name, pp=pp, microbatches=m, vpp=vpp)
    assert (schedule.name, schedule.pp, schedule.vpp, schedule.microbatches) == (name, pp, vpp, m)
    assert len(schedule.actions) == pp
    counts = Counter()
    for rank, actions in enumerate(schedule.actions):
        position = {}
        for i, a in enumerate(actions):
            key = (a.kind, a.microbatch, schedule.stage_of(rank, a.chunk))
            counts[key] += 1
            position[key] = i
        for (kind, mb, stage), i in position.items():
            if kind in "BI":
                assert position[("F", mb, stage)] < i
            if kind == "W":
                assert position[("I", mb, stage)] < i
    backward = ("I", "W") if name == "zero-bubble" else ("B",)
    expected = {(k, mb, s): 1 for k in ("F", *backward) for mb in range(m) for s in range(pp * vpp)}
    assert counts == expected
    validate(schedule)


@pytest.mark.parametrize("pp", range(1, 9))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
def test_1f1b_warms_up_with_pp_minus_rank_minus_1_forwards_then_alternates(pp, m):
    schedule = build("1f1b", pp=pp, microbatches=m)
    for rank, actions in enumerate(schedule.actions):
        warmup = min(pp - rank - 1, m)
        assert [a.kind for a in actions[:warmup]] == ["F"] * warmup
        steady = m - warmup
        assert [a.kind for a in actions[warmup : warmup + 2 * steady]] == ["F", "B"] * steady
        assert [a.kind for a in actions[warmup + 2 * steady :]] == ["B"] * warmup
        assert [a.microbatch for a in actions if a.kind == "F"] == list(range(m))
        assert [a.microbatch for a in actions if a.kind == "B"] == list(range(m))


def test_gpipe_runs_all_forwards_then_all_backwards():
    schedule = build("gpipe", pp=3, microbatches=4)
    expected = [Action("F", mb) for mb in range(4)] + [Action("B", mb) for mb in range(4)]
    assert all(list(actions) == expected for actions in schedule.actions)


def test_interleaved_follows_megatrons_schedule_table():
    # Megatron's own example (PP2, group N=3, M=5, VP2): microbatches 0 1 2 0 1 2 3 4 3 4, chunks 0 0 0 1 1 1 0 0 1 1.
    schedule = build("interleaved-1f1b", pp=2, microbatches=5, vpp=2, group_size=3)
    table = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 0), (4, 0), (3, 1), (4, 1)]
    for rank, actions in enumerate(schedule.actions):
        assert [(a.microbatch, a.chunk) for a in actions if a.kind == "F"] == table
        assert [(a.microbatch, a.chunk) for a in actions if a.kind == "B"] == [(mb, 1 - c) for mb, c in table]
        warmup = min(2 * (2 - rank - 1) + (2 - 1) * 3, 10)
        assert [a.kind for a in actions[:warmup]] == ["F"] * warmup
        assert actions[warmup + 1].kind == "B"


@pytest.mark.parametrize(("pp", "m", "vpp"), [(2, 2, 2), (2, 4, 3), (4, 8, 2), (4, 4, 4), (3, 9, 2)])
def test_interleaved_warmup_is_megatrons(pp, m, vpp):
    schedule = build("interleaved-1f1b", pp=pp, microbatches=m, vpp=vpp)
    for rank, actions in enumerate(schedule.actions):
        warmup = min(2 * (pp - rank - 1) + (vpp - 1) * pp, m * vpp)
        kinds = [a.kind for a in actions]
        assert kinds[:warmup] == ["F"] * warmup
        assert warmup == m * vpp or kinds[warmup : warmup + 2] == ["F", "B"]


def test_zero_bubble_splits_the_backward_and_keeps_1f1b_warmup():
    schedule = build("zero-bubble", pp=4, microbatches=8)
    assert schedule.split_backward
    assert not build("1f1b", pp=4, microbatches=8).split_backward
    for rank, actions in enumerate(schedule.actions):
        first_i = next(i for i, a in enumerate(actions) if a.kind == "I")
        assert first_i == 4 - rank
        assert {a.kind for a in actions} == {"F", "I", "W"}


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zero-bubble"])
@pytest.mark.parametrize(("pp", "m"), [(4, 1), (4, 2), (8, 3), (16, 1)])
def test_fewer_microbatches_than_stages_give_a_valid_schedule(name, pp, m):
    validate(build(name, pp=pp, microbatches=m))


def test_large_pipelines_are_valid():
    for name, vpp in (("1f1b", 1), ("zero-bubble", 1), ("interleaved-1f1b", 2), ("gpipe", 1)):
        validate(build(name, pp=64, microbatches=128, vpp=vpp))


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"name": "pipedream", "pp": 2, "microbatches": 2}, "unknown schedule 'pipedream'"),
        ({"name": "1f1b", "pp": 0, "microbatches": 2}, "pp=0 must be an integer >= 1"),
        ({"name": "1f1b", "pp": 2, "microbatches": 0}, "microbatches=0 must be an integer >= 1"),
        ({"name": "1f1b", "pp": 2, "microbatches": 2.0}, "microbatches=2.0 must be an integer"),
        ({"name": "1f1b", "pp": True, "microbatches": 2}, "pp=True must be an integer"),
        ({"name": "gpipe", "pp": 2, "microbatches": 4, "vpp": 2}, "vpp must be 1, got vpp=2"),
        ({"name": "zero-bubble", "pp": 2, "microbatches": 4, "vpp": 2}, "vpp must be 1"),
        ({"name": "1f1b", "pp": 2, "microbatches": 4, "group_size": 2}, "group_size applies only"),
        ({"name": "interleaved-1f1b", "pp": 1, "microbatches": 4, "vpp": 2}, "needs pp >= 2 to interleave"),
        ({"name": "interleaved-1f1b", "pp": 2, "microbatches": 4}, "needs vpp >= 2"),
        ({"name": "interleaved-1f1b", "pp": 4, "microbatches": 2, "vpp": 2}, "pp <= group_size <= microbatches"),
        ({"name": "interleaved-1f1b", "pp": 4, "microbatches": 6, "vpp": 2}, "microbatches must be a multiple of pp"),
        ({"name": "interleaved-1f1b", "pp": 2, "microbatches": 7, "vpp": 2, "group_size": 3}, "remainder 1"),
        ({"name": "interleaved-1f1b", "pp": 2, "microbatches": 4, "vpp": 2, "group_size": 5}, "group_size=5"),
        ({"name": "1f1b", "pp": 4, "microbatches": 4, "num_layers": 10}, "num_layers=10 is not divisible by"),
        ({"name": "interleaved-1f1b", "pp": 2, "microbatches": 4, "vpp": 3, "num_layers": 8}, "pp*vpp=6"),
        ({"name": "1f1b", "pp": 2, "microbatches": 4, "num_layers": 0}, "num_layers=0"),
    ],
)
def test_invalid_requests_are_refused_naming_the_rule(kwargs, rule):
    name = kwargs.pop("name")
    with pytest.raises(PipelineScheduleError, match=rule.replace("*", r"\*").replace("(", r"\(")):
        build(name, **kwargs)


def test_errors_are_value_errors():
    assert issubclass(PipelineScheduleError, ValueError)


def test_divisible_layer_counts_and_other_group_sizes_are_accepted():
    build("1f1b", pp=4, microbatches=4, num_layers=8)
    build("interleaved-1f1b", pp=2, microbatches=5, vpp=2, group_size=5, num_layers=8)
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zb-v", "dualpipe-v"}


def test_schedule_is_frozen_data_with_looped_placement():
    schedule = build("interleaved-1f1b", pp=4, microbatches=4, vpp=2)
    assert schedule.num_stages == 8
    assert [schedule.stage_of(r, c) for c in range(2) for r in range(4)] == list(range(8))
    assert all(schedule.placement(schedule.stage_of(r, c)) == (r, c) for r in range(4) for c in range(2))
    assert isinstance(schedule.actions, tuple) and isinstance(schedule.actions[0], tuple)
    with pytest.raises(AttributeError):
        schedule.pp = 3
    with pytest.raises(PipelineScheduleError, match=r"chunk=2 is outside 0\.\.1"):
        schedule.stage_of(0, 2)
    with pytest.raises(PipelineScheduleError, match=r"rank=4 is outside 0\.\.3"):
        schedule.stage_of(4, 0)
    with pytest.raises(PipelineScheduleError, match="stage=8 is outside"):
        schedule.placement(8)
    assert hash(schedule) == hash(build("interleaved-1f1b", pp=4, microbatches=4, vpp=2))


def test_actions_and_schedules_check_their_fields():
    assert Action("F", 3).chunk == 0
    assert Action("B", 3, 1).label == "B3c1"
    assert str(Action("W", 2)) == "W(microbatch=2, chunk=0)"
    with pytest.raises(PipelineScheduleError, match="kind='X'"):
        Action("X", 0)
    with pytest.raises(PipelineScheduleError, match="microbatch=-1"):
        Action("F", -1)
    with pytest.raises(PipelineScheduleError, match="action lists for 1 ranks but pp=2"):
        Schedule("mine", 2, 1, 1, [[Action("F", 0), Action("B", 0)]])
    with pytest.raises(PipelineScheduleError, match="rank 0 action 0 is 'F0', not an Action"):
        Schedule("mine", 1, 1, 1, [["F0"]])
    with pytest.raises(PipelineScheduleError, match="vpp=0"):
        Schedule("mine", 1, 0, 1, [[]])
    edited = build("1f1b", pp=1, microbatches=1).with_actions([[Action("F", 0), Action("B", 0)]])
    assert edited == build("1f1b", pp=1, microbatches=1)
