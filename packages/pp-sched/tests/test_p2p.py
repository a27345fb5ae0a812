"""``StageP2P`` on real ranks (gloo): messages of several tensors of any shape and dtype cross every stage
boundary of a looped pipeline (including the wrap from the last rank to rank 0's next chunk), gradients
come back for the floating-point tensors, and no ordering of sends and receives deadlocks.

Values are exact (``rtol=atol=0``): p2p copies bytes."""

import pytest
import torch
import torch.distributed as dist

from pp_sched import PipelineScheduleError, StageP2P, TensorSpec
from pp_sched.plan import Message

SPECS = [
    TensorSpec((2, 3), torch.float32),
    TensorSpec((5,), torch.int64),
    TensorSpec((2, 2), torch.bool),
    TensorSpec((1, 2, 3), torch.bfloat16),
    TensorSpec((), torch.float64),
]


def message(stage, microbatch, kind):
    """The deterministic tensors stage ``stage`` sends for ``microbatch`` (kind 0 activation, 1 gradient)."""
    generator = torch.Generator().manual_seed(1000 * stage + 10 * microbatch + kind)
    specs = SPECS if kind == 0 else [s for s in SPECS if s.has_grad]
    out = []
    for spec in specs:
        values = torch.randn(spec.shape, generator=generator) * 10
        out.append(values > 0 if spec.dtype == torch.bool else values.to(spec.dtype))
    return tuple(out)


def addressed(direction, stage, microbatch, pp, sending):
    """The message ``stage`` sends (``sending``) or receives in ``direction``, on a looped pipeline."""
    towards_next = (direction == "forward") == sending
    boundary = stage if towards_next else stage - 1
    earlier, later = boundary % pp, (boundary + 1) % pp
    src, dst = (later, earlier) if direction == "backward" else (earlier, later)
    return Message(direction, boundary, microbatch, src, dst)


def pipeline_round_trip(vpp, declared, odd_first):
    """Every stage sends activations of 3 microbatches forward, then gradients back. With ``odd_first``,
    odd ranks post their receives before their sends, in separate exchanges, while even ranks send first."""
    pp, rank = dist.get_world_size(), dist.get_rank()
    p2p = StageP2P(dist.group.WORLD, pp=pp, vpp=vpp, specs=SPECS if declared else None)
    stages = [c * pp + rank for c in range(vpp)]
    last = pp * vpp - 1
    received = {}
    for direction, kind in (("forward", 0), ("backward", 1)):
        sends, recvs, keys = [], [], []
        for stage in stages:
            for mb in range(3):
                if (stage < last) if kind == 0 else (stage > 0):
                    sends.append((addressed(direction, stage, mb, pp, True), message(stage, mb, kind)))
                if (stage > 0) if kind == 0 else (stage < last):
                    recvs.append(addressed(direction, stage, mb, pp, False))
                    keys.append((direction, stage, mb))
        if odd_first and rank % 2:
            got = p2p.exchange(recvs=recvs).wait()
            p2p.exchange(sends=sends)
        elif odd_first:
            p2p.exchange(sends=sends)
            got = p2p.exchange(recvs=recvs).wait()
        else:  # all in one batch: the symmetric case that blocking sends would deadlock
            got = p2p.exchange(sends, recvs).wait()
        received.update({(direction, stage, mb): t for (direction, stage, mb), t in zip(keys, got)})
    p2p.wait_sends()
    return received


@pytest.mark.parametrize("declared", [False, True])
@pytest.mark.parametrize("odd_first", [False, True])
@pytest.mark.parametrize(("pp", "vpp"), [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_messages_cross_every_boundary_both_ways(run_ranks, pp, vpp, odd_first, declared):
    results = run_ranks(pp, pipeline_round_trip, vpp, declared, odd_first)
    last = pp * vpp - 1
    for rank, received in enumerate(results):
        expected = {}
        for stage in range(rank, pp * vpp, pp):
            for mb in range(3):
                if stage > 0:
                    expected[("forward", stage, mb)] = message(stage - 1, mb, 0)
                if stage < last:
                    expected[("backward", stage, mb)] = message(stage + 1, mb, 1)
        assert received.keys() == expected.keys()
        for key, tensors in received.items():
            assert [TensorSpec.of(t) for t in tensors] == [TensorSpec.of(t) for t in expected[key]]
            for got, want in zip(tensors, expected[key]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def wrong_shapes(declared):
    rank = dist.get_rank()
    p2p = StageP2P(dist.group.WORLD, pp=2, specs=[TensorSpec((2, 3), torch.float32)] if declared else None)
    try:
        if rank == 0:
            if not declared:
                p2p.exchange(sends=[(Message("forward", 0, 0, 0, 1), (torch.zeros(2, 3),))])
            p2p.exchange(sends=[(Message("forward", 0, 1, 0, 1), (torch.zeros(3, 2),))])
        elif not declared:
            p2p.exchange(recvs=[Message("forward", 0, 0, 0, 1)]).wait()
    except PipelineScheduleError as error:
        return str(error)
    finally:
        p2p.wait_sends()
    return None


@pytest.mark.parametrize("declared", [False, True])
def test_a_message_whose_shapes_change_is_refused(run_ranks, declared):
    message0, message1 = run_ranks(2, wrong_shapes, declared)
    assert "has tensors (TensorSpec(shape=(3, 2)" in message0
    assert "carries (TensorSpec(shape=(2, 3)" in message0
    assert message1 is None


def misaddressed():
    p2p = StageP2P(dist.group.WORLD, pp=2)
    rank = dist.get_rank()
    errors = []
    for call in (
        lambda: p2p.exchange(recvs=[Message("forward", 1, 0, 0, 1)]),  # 2 stages: one boundary
        lambda: p2p.exchange(recvs=[Message("backward", 0, 0, 1 - rank, 1 - rank)]),  # not to this rank
        lambda: p2p.exchange(recvs=[Message("sideways", 0, 0, 1 - rank, rank)]),
    ):
        try:
            call()
        except PipelineScheduleError as error:
            errors.append(str(error))
    return errors


def test_misaddressed_messages_are_refused_without_communicating(run_ranks):
    errors = run_ranks(2, misaddressed)[0]
    assert "boundary 1 is outside 0..0" in errors[0]
    assert "names rank 1 as its receiver, not pipeline rank 0" in errors[1]
    assert "kind='sideways'" in errors[2]
