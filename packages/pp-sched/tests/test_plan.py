"""``posting_order`` / ``check_posting_order``: the p2p posting order is consistent for every pair of ranks
(NCCL matches in posting order and ignores tags) and completes under NCCL's in-order semantics, for every
schedule over a grid of shapes; a broken order is caught. Pure: no processes."""

import pytest

from pp_sched import PipelineScheduleError, build
from pp_sched.plan import Step, check_posting_order, posting_orders, received, sent


def grid():
    for pp in range(1, 6):
        for m in range(1, 2 * pp + 2):
            for name in ("gpipe", "1f1b", "zero-bubble"):
                yield name, pp, 1, m
            if pp >= 2 and m % pp == 0:
                for vpp in (2, 3):
                    yield "interleaved-1f1b", pp, vpp, m


@pytest.mark.parametrize(("name", "pp", "vpp", "m"), list(grid()))
@pytest.mark.parametrize(("train", "declared"), [(True, False), (True, True), (False, False)])
def test_every_schedule_posts_a_consistent_order_that_completes(name, pp, vpp, m, train, declared):
    schedule = build(name, pp=pp, microbatches=m, vpp=vpp)
    plans = posting_orders(schedule, train=train, declared=declared)
    check_posting_order(schedule, plans)
    for rank, plan in enumerate(plans):
        assert [s.action for s in plan] == [a for a in schedule.actions[rank] if train or a.kind == "F"]


def test_swapped_receives_are_caught():
    schedule = build("interleaved-1f1b", pp=2, microbatches=4, vpp=2)
    plans = [list(p) for p in posting_orders(schedule, declared=True)]
    k = next(k for k, s in enumerate(plans[1]) if len(s.recvs) == 1 and s.recvs[0].kind == "forward" and k > 1)
    j = next(j for j in range(k + 1, len(plans[1])) if plans[1][j].recvs and plans[1][j].recvs[0].src == 0)
    a, b = plans[1][k], plans[1][j]
    plans[1][k], plans[1][j] = (
        a.__class__(a.action, b.recvs, a.needs, a.sends),
        b.__class__(b.action, a.recvs, b.needs, b.sends),
    )
    with pytest.raises(PipelineScheduleError, match="rank 0 -> rank 1: message"):
        check_posting_order(schedule, plans)


def own_order(schedule, rank):
    """Each rank receives in its own action order, when it needs the message (the former policy)."""
    return [
        Step(
            a,
            () if received(schedule, rank, a) is None else (received(schedule, rank, a),),
            received(schedule, rank, a),
            () if sent(schedule, rank, a) is None else (sent(schedule, rank, a),),
        )
        for a in schedule.actions[rank]
    ]


@pytest.mark.parametrize(("pp", "vpp"), [(2, 2), (3, 2)])
def test_receiving_only_when_needed_would_hang_on_nccl(pp, vpp):
    """Interleaved: ranks send gradients to each other in batches without the matching receive."""
    schedule = build("interleaved-1f1b", pp=pp, microbatches=2 * pp, vpp=vpp)
    with pytest.raises(PipelineScheduleError, match="wait forever under NCCL"):
        check_posting_order(schedule, [own_order(schedule, r) for r in range(pp)])
    check_posting_order(schedule, declared=True)
