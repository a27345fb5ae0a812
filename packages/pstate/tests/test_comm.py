"""``pstate.comm``: the recording layer records what each call moved, names the axis, and is off by default."""

import pytest
import torch
import torch.distributed as dist

import pstate
from pstate import comm
from pstate.comm import CommRecord, CommRecorder


def calls() -> tuple[list[tuple], float, dict, list]:
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
        x = torch.ones(6)
        comm.all_reduce(x, group=ps.tp)  # no recorder: nothing recorded, result as dist's
        outside = x.tolist()
        with CommRecorder.for_state(ps) as rec:
            comm.all_reduce(torch.ones(6), group=ps.tp)
            out = torch.empty(4 * ps.dp.size, dtype=torch.float64)
            comm.all_gather(out, torch.full((4,), float(ps.dp.rank), dtype=torch.float64), group=ps.dp_cp)
            piece = torch.empty(2)
            work = comm.reduce_scatter(piece, torch.ones(2 * ps.world_size), group=ps.world, async_op=True)
            work.wait()
            comm.broadcast(torch.zeros(3, dtype=torch.bfloat16), 0, group=None)
            peer = (ps.rank + 1) % ps.world_size, (ps.rank - 1) % ps.world_size
            buffer = torch.empty(5)
            ops = [dist.P2POp(dist.isend, torch.ones(5), peer[0]), dist.P2POp(dist.irecv, buffer, peer[1])]
            for w in comm.batch_isend_irecv(ops):
                w.wait()
        records = [(r.op, r.axis, r.dtype, r.bytes, r.size) for r in rec.records]
        assert all(r.seconds > 0 for r in rec.records)
        return records, outside[0], rec.by_axis(), out.tolist()


def test_records_op_axis_dtype_and_bytes(run_ranks):
    for records, outside, by_axis, gathered in run_ranks(4, calls):
        assert outside == 2.0  # summed over tp=2, unrecorded
        assert gathered == [0.0] * 4 + [1.0] * 4
        assert records == [
            ("all_reduce", "tp", torch.float32, 24, 2),
            ("all_gather", "dp", torch.float64, 64, 2),  # dp_cp at cp=1 is named dp
            ("reduce_scatter", "tp_dp", torch.float32, 32, 4),  # the world is the tp x dp group here
            ("broadcast", "tp_dp", torch.bfloat16, 6, 4),
            ("send", "tp_dp", torch.float32, 20, 4),
            ("recv", "tp_dp", torch.float32, 20, 4),
        ]
        assert by_axis["tp"]["calls"] == 1 and by_axis["tp_dp"]["bytes"] == 32 + 6 + 40
        assert by_axis["dp"]["wire_bytes"] == pytest.approx(32.0)  # (n-1)/n of 64 bytes at n=2


def test_wire_bytes_follow_the_ring_factors():
    record = lambda op, size: CommRecord(op, "dp", torch.float32, 800, size)  # noqa: E731
    assert record("all_reduce", 8).wire_bytes == pytest.approx(2 * 7 / 8 * 800)
    assert record("reduce_scatter", 8).wire_bytes == pytest.approx(7 / 8 * 800)
    assert record("all_gather", 4).wire_bytes == pytest.approx(3 / 4 * 800)
    assert record("broadcast", 4).wire_bytes == 800
    assert record("send", 2).wire_bytes == 800
    assert record("all_reduce", 1).wire_bytes == 0.0


def scratch_reduce_scatter() -> list:
    with pstate.initialize(pstate.ParallelConfig(tp=4)) as ps:
        rank = ps.tp.rank
        data = lambda: torch.arange(24.0).view(8, 3) * (rank + 1)  # noqa: E731
        results = []
        with CommRecorder.for_state(ps) as rec:
            for async_op in (False, True):
                for scratch in (False, True):
                    out = torch.empty(2, 3)
                    work = comm.reduce_scatter(out, data(), group=ps.tp, async_op=async_op, scratch_input=scratch)
                    if async_op:
                        work.wait()
                    results.append(out)
        return results, [(r.op, r.axis, r.bytes) for r in rec.records]


def test_scratch_input_reduce_scatter_equals_the_plain_one(run_ranks):
    """On gloo the scratch path is an in-place all-reduce plus this rank's piece copied out: the same
    result, synchronous or waited on, and recorded as the reduce-scatter it stands for."""
    for rank, (results, records) in enumerate(run_ranks(4, scratch_reduce_scatter)):
        expected = (torch.arange(24.0).view(8, 3) * 10)[2 * rank : 2 * rank + 2]
        for out in results:
            assert torch.equal(out, expected)
        assert records == [("reduce_scatter", "tp", 96)] * 4
