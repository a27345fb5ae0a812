"""The router's auxiliary losses over tokens split between ranks (sequence parallelism, CP) equal one
process's on all the tokens: with ``aux_loss_group`` each rank backpropagates its share, so the router
weight's gradients summed over the group (what sequence parallelism does with the router's tagged
gradient) are the one-process gradients, and ``aux_losses`` hold the one-process values. Without the
group each rank's losses are over its own tokens only, and the summed gradient is different.

Tolerance: ``torch.testing``'s float32 default (the same sums in another order).
"""

import pytest
import torch
import torch.distributed as dist

from moe_dispatch import TopKRouter

TOKENS, HIDDEN, EXPERTS, TOPK = 12, 8, 4, 2
OPTIONS = {"aux_loss_coeff": 0.3, "z_loss_coeff": 0.2}


def inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, EXPERTS, generator=g)


def run(router, x, c):
    probs, _ = router(x)
    (probs * c).sum().backward()
    return router.weight.grad, {k: v.item() for k, v in router.aux_losses.items()}


def split(grouped: bool):
    rank, world = dist.get_rank(), dist.get_world_size()
    x, c = (t.chunk(world)[rank] for t in inputs())
    router = TopKRouter(HIDDEN, EXPERTS, TOPK, seed=3, aux_loss_group=dist.group.WORLD if grouped else None, **OPTIONS)
    grad, losses = run(router, x, c)
    dist.all_reduce(grad)
    return grad, losses


@pytest.mark.parametrize("world", [2, 3])
def test_losses_and_gradients_over_the_group_equal_one_process(run_ranks, world):
    want_grad, want_losses = run(TopKRouter(HIDDEN, EXPERTS, TOPK, seed=3, **OPTIONS), *inputs())
    for grad, losses in run_ranks(world, split, True):
        torch.testing.assert_close(grad, want_grad)
        assert losses == pytest.approx(want_losses, rel=1e-6)


def test_without_the_group_each_rank_balances_its_own_tokens(run_ranks):
    want_grad, _ = run(TopKRouter(HIDDEN, EXPERTS, TOPK, seed=3, **OPTIONS), *inputs())
    grad, _ = run_ranks(2, split, False)[0]
    assert not torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-5)
