"""``shard_sequence`` / ``unshard_sequence``: placement, round trip, gradients and size errors."""

import pytest
import torch
import torch.distributed as dist

from cp_ring import ContextParallelError, shard_sequence, unshard_sequence
from pstate.testing import error_messages


def shard_positions(cp_dim, zigzag):
    """Shard position ids ``[2, 16]`` along dim 1 (labels/ids layout) and a ``[16, 2, 3]`` hidden tensor
    along dim 0; return both parts and both round trips."""
    group = dist.group.WORLD
    ids = torch.arange(16).repeat(2, 1)
    hidden = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    parts = (
        shard_sequence(ids, group=group, dim=cp_dim, zigzag=zigzag),
        shard_sequence(hidden, group=group, zigzag=zigzag),
    )
    back = (
        unshard_sequence(parts[0], group=group, dim=cp_dim, zigzag=zigzag),
        unshard_sequence(parts[1], group=group, zigzag=zigzag),
    )
    return parts[0], torch.equal(back[0], ids), torch.equal(back[1], hidden)


@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_placement_and_round_trip(run_ranks, cp, zigzag):
    for rank, (ids, ids_back, hidden_back) in enumerate(run_ranks(cp, shard_positions, 1, zigzag)):
        if zigzag:
            chunk = 16 // (2 * cp)
            expected = [
                *range(rank * chunk, (rank + 1) * chunk),
                *range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk),
            ]
        else:
            expected = list(range(rank * 16 // cp, (rank + 1) * 16 // cp))
        assert ids[0].tolist() == expected
        assert ids_back and hidden_back


def unshard_grad(reduce_grad):
    """Each rank weights the gathered sequence by its own ``C_rank``: the full gradient of the summed loss
    wrt a part is that part of ``sum_rank C_rank`` (with ``reduce_grad``), else of this rank's ``C``."""
    group, rank = dist.group.WORLD, dist.get_rank()
    part = torch.randn(8, 2, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    full = unshard_sequence(part, group=group, reduce_grad=reduce_grad)
    weights = torch.arange(16.0).unsqueeze(1) * (rank + 1)
    (full * weights).sum().backward()
    return part.grad


@pytest.mark.parametrize("reduce_grad", [False, True])
def test_unshard_gradient(run_ranks, reduce_grad):
    cp = 2
    for rank, grad in enumerate(run_ranks(cp, unshard_grad, reduce_grad)):
        base = torch.arange(16.0).unsqueeze(1).expand(16, 2)
        factor = sum(r + 1 for r in range(cp)) if reduce_grad else rank + 1
        chunks = (base * factor).chunk(2 * cp)
        torch.testing.assert_close(grad, torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]]), rtol=0, atol=0)


def bad_lengths():
    group = dist.group.WORLD
    return error_messages(
        [
            lambda: shard_sequence(torch.zeros(6, 2), group=group),
            lambda: shard_sequence(torch.zeros(2, 6), group=group, dim=1, zigzag=False),
            lambda: unshard_sequence(torch.zeros(3, 2), group=group),
        ],
        ContextParallelError,
    )


def test_lengths_that_do_not_divide_raise(run_ranks):
    zigzag, contiguous, odd = run_ranks(4, bad_lengths)[0]
    assert "length 6, which does not divide into 2*cp=8 zigzag chunks (cp=4)" in zigzag
    assert "length 6, which does not divide into cp=4 contiguous chunks" in contiguous
    assert "odd local length 3" in odd
