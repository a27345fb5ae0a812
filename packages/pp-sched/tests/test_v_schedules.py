"""ZB-V and DualPipe-V as data: the V layout, every stage forwarded and backwarded once, activation memory
of 1F1B, a smaller bubble than ZB-H1 once the pipeline is full, DualPipe-V's pairs, the posting order
(consistent and complete under NCCL's semantics), the renderer, and refusals. Pure: no processes."""

from collections import Counter

import pytest

from pp_sched import PipelineScheduleError, Schedule, build, render, simulate, split_layers, validate
from pp_sched.plan import check_posting_order, posting_orders

NAMES = ("zb-v", "dualpipe-v")
GRID = [
    (name, pp, m) for name in NAMES for pp in range(2, 9) for m in sorted({1, 2, 3, pp, 2 * pp, 2 * pp + 3, 4 * pp})
]


def test_v_layout_puts_the_first_and_last_stage_on_rank_0():
    schedule = build("zb-v", pp=4, microbatches=8)
    assert (schedule.vpp, schedule.layout) == (2, "v")
    assert [schedule.stage_of(r, 0) for r in range(4)] == [0, 1, 2, 3]
    assert [schedule.stage_of(r, 1) for r in range(4)] == [7, 6, 5, 4]
    assert all(schedule.placement(schedule.stage_of(r, c)) == (r, c) for r in range(4) for c in range(2))
    assert schedule.rank_of(7) == 0 and schedule.rank_of(4) == 3
    stages = split_layers(16, pp=4, vpp=2, layout="v")
    assert [(s.rank, s.chunk) for s in stages] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (1, 1), (0, 1)]
    assert stages[0].embedding and stages[-1].head and stages[-1].rank == 0


@pytest.mark.parametrize(("name", "pp", "m"), GRID)
def test_every_microbatch_passes_every_stage_once_within_1f1b_memory(name, pp, m):
    schedule = build(name, pp=pp, microbatches=m)
    validate(schedule)
    counts = Counter()
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            stage = schedule.stage_of(rank, a.chunk)
            counts["B" if a.kind in "BI" else a.kind, a.microbatch, stage] += 1
            if a.kind == "B":  # a full backward does the weight part too
                counts["W", a.microbatch, stage] += 1
    assert set(counts.values()) == {1} and len(counts) == 3 * m * 2 * pp
    sim = simulate(schedule)
    # each chunk set is half a rank's layers: 2 * pp of them is 1F1B's pp whole-rank sets
    assert max(sim.peak_activations) <= 2 * pp
    if name == "zb-v":
        assert all(a.kind != "B" for actions in schedule.actions for a in actions)
        assert schedule.pairs == ((),) * pp


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pp", [2, 3, 4, 6, 8])
def test_bubble_is_below_zb_h1_and_1f1b_once_the_pipeline_is_full(name, pp):
    m = 2 * pp
    v = simulate(build(name, pp=pp, microbatches=m)).bubble_fraction
    assert v < simulate(build("zero-bubble", pp=pp, microbatches=m)).bubble_fraction
    assert v < simulate(build("1f1b", pp=pp, microbatches=m)).bubble_fraction


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipe_v_pairs_a_forward_with_a_backward_of_another_microbatch(pp):
    schedule = build("dualpipe-v", pp=pp, microbatches=4 * pp)
    assert sum(map(len, schedule.pairs)) > 0
    for rank, pairs in enumerate(schedule.pairs):
        for k in pairs:
            first, second = schedule.actions[rank][k], schedule.actions[rank][k + 1]
            assert first.kind == "F" and second.kind == "B" and first.microbatch != second.microbatch
    text = render(schedule)
    assert "==" in text and "overlapped pair" in text


def test_pairs_are_checked():
    schedule = build("dualpipe-v", pp=2, microbatches=4)
    rank, k = next((r, pairs[0]) for r, pairs in enumerate(schedule.pairs) if pairs)
    with pytest.raises(PipelineScheduleError, match="a pair is a forward and then a backward"):
        schedule.with_actions(schedule.actions, [[k + 1] if r == rank else [] for r in range(2)])
    with pytest.raises(PipelineScheduleError, match="outside its actions"):
        schedule.with_actions(schedule.actions, [[10**6], []])


@pytest.mark.parametrize(("name", "pp", "m"), [g for g in GRID if g[1] <= 6])
@pytest.mark.parametrize(("train", "declared"), [(True, False), (True, True), (False, False)])
def test_posting_order_is_consistent_and_completes(name, pp, m, train, declared):
    schedule = build(name, pp=pp, microbatches=m)
    plans = posting_orders(schedule, train=train, declared=declared)
    check_posting_order(schedule, plans)
    turn = pp - 1  # the V's turn stays on rank pp - 1 and is never posted
    assert not any(msg.boundary == turn for plan in plans for step in plan for msg in step.recvs + step.sends)
    assert any(step.out is not None and step.out.local for step in plans[pp - 1])


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"name": "zb-v", "pp": 1, "microbatches": 4}, "needs pp >= 2 to form a V"),
        ({"name": "dualpipe-v", "pp": 4, "microbatches": 4, "vpp": 1}, "vpp must be 2"),
        ({"name": "zb-v", "pp": 4, "microbatches": 4, "vpp": 3}, "vpp must be 2"),
        ({"name": "zb-v", "pp": 2, "microbatches": 4, "group_size": 2}, "group_size applies only"),
        ({"name": "zb-v", "pp": 2, "microbatches": 4, "num_layers": 6}, r"not divisible by pp\*vpp=4"),
    ],
)
def test_invalid_v_requests_are_refused_naming_the_rule(kwargs, rule):
    name = kwargs.pop("name")
    with pytest.raises(PipelineScheduleError, match=rule):
        build(name, **kwargs)


def test_a_v_layout_needs_two_chunks():
    with pytest.raises(PipelineScheduleError, match="vpp must be 2"):
        Schedule("x", 2, 3, 1, ((), ()), "v")
    with pytest.raises(PipelineScheduleError, match="layout='w'"):
        Schedule("x", 2, 1, 1, ((), ()), "w")
    with pytest.raises(PipelineScheduleError, match="vpp must be 2"):
        split_layers(8, pp=2, vpp=1, layout="v")
