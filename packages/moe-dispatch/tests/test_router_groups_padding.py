"""Group-limited top-k and padding to capacity in ``TopKRouter``, against hand-computed cases and a
per-token Python reference that enumerates the groups one by one.

The router weight is the identity, so the input rows are the logits. Index sets are compared exactly;
probabilities with torch's float32 defaults (the same few operations in another order).
"""

import itertools

import pytest
import torch

from moe_dispatch import MoEError, MoELayer, TopKRouter
from moe_dispatch.capacity import pad_to_capacity


def router_with_identity(num_experts, topk, **options):
    router = TopKRouter(num_experts, num_experts, topk, **options)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def test_a_group_is_scored_by_its_two_best_experts():
    # Groups {0,1}, {2,3}, {4,5}. Expert 0 has the best single score, but group {2,3} has the best
    # sum of two (0.8 + 0.7); with one group allowed, top-2 must come from {2,3}.
    router = router_with_identity(6, 2, score="sigmoid", num_groups=3, topk_groups=1)
    scores = torch.tensor([[0.95, 0.1, 0.8, 0.7, 0.6, 0.5]])
    probs, routing_map = router(torch.logit(scores))
    assert routing_map.tolist() == [[False, False, True, True, False, False]]
    torch.testing.assert_close(probs[0, 2:4], torch.tensor([0.8, 0.7]) / 1.5)
    # Without the group limit the same token picks experts 0 and 2.
    plain = router_with_identity(6, 2, score="sigmoid")
    assert plain(torch.logit(scores))[1].nonzero()[:, 1].tolist() == [0, 2]


def reference_choice(key, k, num_groups, topk_groups):
    """Each token's chosen experts: try every set of ``topk_groups`` groups the slow way."""
    per_group = key.size(1) // num_groups
    chosen = []
    for row in key.tolist():
        groups = [row[g * per_group : (g + 1) * per_group] for g in range(num_groups)]
        group_score = [sum(sorted(g, reverse=True)[: min(2, per_group)]) for g in groups]
        best = max(itertools.combinations(range(num_groups), topk_groups), key=lambda s: sum(group_score[g] for g in s))
        allowed = [e for g in best for e in range(g * per_group, (g + 1) * per_group)]
        chosen.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return chosen


@pytest.mark.parametrize(
    ("score", "num_groups", "topk_groups", "topk"),
    [("sigmoid", 4, 2, 3), ("softmax", 4, 1, 2), ("softmax", 2, 1, 4), ("sigmoid", 8, 3, 3)],
)
def test_group_limited_choice_equals_the_slow_reference(score, num_groups, topk_groups, topk):
    torch.manual_seed(0)
    options = {"score": score, "num_groups": num_groups, "topk_groups": topk_groups, "expert_bias": True}
    router = router_with_identity(8, topk, **options)
    router.expert_bias.copy_(torch.randn(8) * 0.3)  # the bias takes part in the choice of groups too
    logits = torch.randn(64, 8)
    probs, routing_map = router(logits)
    key = (torch.sigmoid(logits) if score == "sigmoid" else logits) + router.expert_bias
    expected = reference_choice(key, topk, num_groups, topk_groups)
    assert [set(row.nonzero().flatten().tolist()) for row in routing_map] == expected
    # The probabilities of the chosen experts are the usual ones, computed from the logits alone.
    picked = logits.masked_fill(~routing_map, float("-inf"))
    want = torch.softmax(picked, -1) if score == "softmax" else torch.sigmoid(logits) * routing_map
    if score == "sigmoid":
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, want)


def test_padding_fills_each_expert_with_the_earliest_unrouted_tokens():
    routing_map = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    padded = pad_to_capacity(routing_map, 2)
    assert padded.t().tolist() == [[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    # Capacity above the number of tokens: every token, once.
    assert pad_to_capacity(routing_map, 9).all()


def test_padded_router_has_static_columns_and_zero_padding_probabilities():
    # Six tokens, top-1 over 3 experts, capacity ceil(6 * 1 / 3 * 1.0) = 2.
    router = router_with_identity(3, 1, capacity_factor=1.0, pad_to_capacity=True)
    logits = torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 0.5], [0, 0, 1.0]])
    probs, routing_map = router(logits)
    dropping = router_with_identity(3, 1, capacity_factor=1.0)
    want_probs, want_map = dropping(logits)
    assert routing_map.sum(0).tolist() == [2, 2, 2]
    assert (routing_map & ~want_map).sum().item() == 1  # one padding entry: expert 1 had one token
    assert routing_map[want_map].all()  # everything kept by dropping is still routed
    assert torch.equal(probs, want_probs)  # padding entries have probability zero
    assert router.tokens_per_expert.tolist() == [2, 1, 2]  # real tokens only


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_groups": 3}, "num_groups=3: must be a positive divisor of num_experts=8"),
        ({"num_groups": 4, "topk_groups": 5}, "topk_groups=5: must be between 1 and num_groups=4"),
        ({"num_groups": 4, "topk_groups": 1}, "topk=3: more than the 2 experts in topk_groups=1 groups of 2"),
        ({"pad_to_capacity": True}, "pad_to_capacity=True: needs a capacity_factor"),
    ],
)
def test_bad_group_and_padding_options_are_refused(options, message):
    with pytest.raises(MoEError, match=message):
        TopKRouter(4, 8, 3, **options)


def test_bad_layer_options_and_inputs_are_refused():
    with pytest.raises(MoEError, match=r"unknown option\(s\) \['capacity'\]"):
        MoELayer(8, 8, 4, 2, capacity=2)
    with pytest.raises(MoEError, match="set shared_ffn_hidden"):
        MoELayer(8, 8, 4, 2, shared_gate=True)
    layer = MoELayer(8, 8, 4, 2)
    with pytest.raises(MoEError, match=r"input has shape \(5, 2, 4\), expected \[seq, batch, 8\]"):
        layer(torch.randn(5, 2, 4))
    with pytest.raises(MoEError, match=r"input has shape \(5, 8, 2\), expected \[tokens, 8\]"):
        layer.router(torch.randn(5, 8, 2))
