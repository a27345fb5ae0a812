"""``all_to_all_sp2hp`` / ``all_to_all_hp2sp``: the layouts they produce, inverses, gradients, size errors.

Pure data movement, so every comparison is exact.
"""

import pytest
import torch
import torch.distributed as dist

from cp_ring import ContextParallelError, all_to_all_hp2sp, all_to_all_sp2hp
from pstate.testing import error_messages

SEQ, BATCH, HIDDEN = 8, 2, 12


def full():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator), torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def exchange():
    group, rank, cp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    x, c = full()
    seq_part = x.chunk(cp, 0)[rank].clone().requires_grad_()
    hidden = all_to_all_sp2hp(seq_part, group=group)
    (hidden * c.chunk(cp, -1)[rank]).sum().backward()
    hidden_part = x.chunk(cp, -1)[rank].clone().requires_grad_()
    back = all_to_all_hp2sp(hidden_part, group=group)
    (back * c.chunk(cp, 0)[rank]).sum().backward()
    round_trip = all_to_all_hp2sp(all_to_all_sp2hp(seq_part.detach(), group=group), group=group)
    return hidden.detach(), seq_part.grad, back.detach(), hidden_part.grad, torch.equal(round_trip, seq_part)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_sp2hp_and_hp2sp_are_inverse_exchanges_with_their_gradients(run_ranks, cp):
    """The summed losses are ``sum(x * c)`` in both directions, so each rank's input gradient is its part
    of ``c`` in the input layout."""
    x, c = full()
    for rank, (hidden, seq_grad, back, hidden_grad, round_trip) in enumerate(run_ranks(cp, exchange)):
        exact = {"rtol": 0, "atol": 0}
        torch.testing.assert_close(hidden, x.chunk(cp, -1)[rank], **exact)
        torch.testing.assert_close(seq_grad, c.chunk(cp, 0)[rank], **exact)
        torch.testing.assert_close(back, x.chunk(cp, 0)[rank], **exact)
        torch.testing.assert_close(hidden_grad, c.chunk(cp, -1)[rank], **exact)
        assert round_trip


def bad_sizes():
    group = dist.group.WORLD
    return error_messages(
        [
            lambda: all_to_all_sp2hp(torch.zeros(2, 1, 6), group=group),
            lambda: all_to_all_hp2sp(torch.zeros(6, 1, 2), group=group),
            lambda: all_to_all_sp2hp(torch.zeros(2, 8), group=group),
        ],
        ContextParallelError,
    )


def test_sizes_that_do_not_divide_raise(run_ranks):
    hidden, seq, shape = run_ranks(4, bad_sizes)[0]
    assert "dimension 2 of shape (2, 1, 6) has size 6, which does not divide evenly over cp=4" in hidden
    assert "dimension 0 of shape (6, 1, 2) has size 6, which does not divide evenly over cp=4" in seq
    assert "expected a [seq, batch, hidden] tensor, got shape (2, 8)" in shape
