"""The dispatcher interface on its own at EP=2: which rows each rank receives, in which order, and
that ``combine`` returns each token's probability-weighted sum of its experts' outputs.

Rank 1 routes none of its tokens (an all-False routing map), so rank 0's experts see only rank 0's
tokens and no rank sends anything to some experts. Expert outputs are ``(local expert + 1) * row``,
so the expected combine is computed by hand. Exact comparisons except for the weighted sums
(float32 defaults).
"""

import pytest
import torch
import torch.distributed as dist

from moe_dispatch import AllGatherDispatcher, AllToAllDispatcher

EXPERTS, TOKENS, HIDDEN = 4, 6, 3


def case(rank):
    generator = torch.Generator().manual_seed(rank)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    probs = torch.rand(TOKENS, EXPERTS, generator=generator)
    routing_map = torch.zeros(TOKENS, EXPERTS, dtype=torch.bool)
    if rank == 0:
        routing_map[:, 0] = True  # every token to expert 0
        routing_map[::2, 3] = True  # every other token also to expert 3
    return hidden, probs * routing_map, routing_map


def run(kind):
    cls = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}[kind]
    dispatcher = cls(EXPERTS, ep_group=dist.group.WORLD)
    hidden, probs, routing_map = case(dist.get_rank())
    rows, counts = dispatcher.dispatch(hidden, probs, routing_map)
    scale = torch.repeat_interleave(torch.arange(1.0, dispatcher.num_local_experts + 1), counts).unsqueeze(1)
    return rows, counts, dispatcher.combine(rows * scale)


@pytest.mark.parametrize("kind", ["alltoall", "allgather"])
def test_rows_arrive_grouped_by_local_expert_and_combine_weights_them(run_ranks, kind):
    (rows0, counts0, out0), (rows1, counts1, out1) = run_ranks(2, run, kind)
    hidden, probs, _ = case(0)
    assert counts0.tolist() == [TOKENS, 0] and counts1.tolist() == [0, TOKENS // 2]
    assert torch.equal(rows0, hidden) and torch.equal(rows1, hidden[::2])
    # Expert 0 is rank 0's local expert 0 (scale 1); expert 3 is rank 1's local expert 1 (scale 2).
    expected = probs[:, 0:1] * hidden + 2 * probs[:, 3:4] * hidden
    torch.testing.assert_close(out0, expected)
    torch.testing.assert_close(out1, torch.zeros(TOKENS, HIDDEN))
