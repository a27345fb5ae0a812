"""``pstate.comm.simulate``: under PyTorch's fake backend (one process playing rank 2 of 4), every
collective fills its output from this rank's input as if every rank held the same tensor, is recorded
as a real call would be, and never reaches the backend; outside it the fake backend is called again."""

import pytest
import torch
import torch.distributed as dist

from pstate import comm


@pytest.fixture
def fake_rank_2_of_4():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=4)
    yield
    dist.destroy_process_group()


def test_outputs_are_filled_from_this_ranks_input(fake_rank_2_of_4):
    x = torch.arange(6.0).reshape(3, 2)
    recorder = comm.CommRecorder()
    with comm.simulate(), recorder:
        gathered = torch.full((12, 2), float("nan"))
        assert comm.all_gather(gathered, x, async_op=True).wait()
        assert torch.equal(gathered, x.repeat(4, 1))
        piece = torch.full((2,), float("nan"))
        comm.reduce_scatter(piece, torch.arange(8.0))
        assert torch.equal(piece, torch.tensor([4.0, 5.0]))  # rank 2's piece of its own input
        summed = x.clone()
        comm.all_reduce(summed)
        assert torch.equal(summed, x)
        out = torch.full((8, 2), float("nan"))
        comm.all_to_all_single(out, torch.arange(16.0).reshape(8, 2))
        assert torch.equal(out, torch.tensor([[8.0, 9.0], [10.0, 11.0]]).repeat(4, 1))
        # uneven splits: pieces whose size is this rank's own piece get it, the others zeros
        out = torch.full((5, 1), float("nan"))
        comm.all_to_all_single(out, torch.arange(6.0).reshape(6, 1), [2, 1, 2, 0], [1, 1, 2, 2])
        assert out.flatten().tolist() == [2.0, 3.0, 0.0, 2.0, 3.0]
        listed = [torch.empty(3, 2) for _ in range(4)]
        comm.all_gather_list(listed, x)
        assert all(torch.equal(t, x) for t in listed)
        received = torch.full((3,), float("nan"))
        ops = [dist.P2POp(dist.isend, x, 1), dist.P2POp(dist.irecv, received, 3)]
        assert all(w.wait() and w.is_completed() for w in comm.batch_isend_irecv(ops))
        assert torch.equal(received, torch.zeros(3))
    assert [r.op for r in recorder.records] == [
        "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "all_to_all", "all_gather", "send", "recv"
    ]  # fmt: skip
    assert [r.bytes for r in recorder.records] == [96, 32, 24, 64, 24, 96, 24, 12]
    assert all(r.seconds == 0.0 for r in recorder.records)
    assert not comm.simulating()


def test_meta_tensors_pass_through(fake_rank_2_of_4):
    with comm.simulate():
        out = torch.empty(8, 16, device="meta")
        comm.all_gather(out, torch.empty(2, 16, device="meta"))
        comm.all_to_all_single(out, torch.empty(8, 16, device="meta"))
        comm.all_reduce(out)
    assert out.is_meta
