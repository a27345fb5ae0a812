"""``TopKRouter`` against hand-computed small cases.

The router weight is set to the identity so that the input rows *are* the logits. Tolerances are
torch's float32 defaults: the hand formulas and the router compute the same few operations.
"""

import math

import pytest
import torch

from moe_dispatch import MoEError, TopKRouter, aux_loss, expert_capacity


def router_with_identity(num_experts, topk, **options):
    router = TopKRouter(num_experts, num_experts, topk, **options)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def test_softmax_after_topk_renormalises_the_chosen_logits():
    router = router_with_identity(4, 2)
    probs, routing_map = router(torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 2.0]]))
    e = math.e
    expected = torch.tensor(
        [
            [0, 1 / (1 + e), e / (1 + e), 0],
            [math.exp(0.5) / (math.exp(0.5) + e**2), 0, 0, e**2 / (math.exp(0.5) + e**2)],
        ]
    )
    torch.testing.assert_close(probs, expected)
    assert routing_map.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_pre_softmax_keeps_the_full_softmax_values():
    router = router_with_identity(3, 2, pre_softmax=True)
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    probs, routing_map = router(logits)
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(probs, full * torch.tensor([[0.0, 1.0, 1.0]]))
    assert routing_map.tolist() == [[False, True, True]]


def test_sigmoid_scores_are_renormalised_over_the_top_k():
    router = router_with_identity(3, 2, score="sigmoid")
    probs, _ = router(torch.tensor([[0.0, 1.0, -2.0]]))
    s0, s1 = 0.5, 1 / (1 + math.exp(-1))
    torch.testing.assert_close(probs, torch.tensor([[s0 / (s0 + s1), s1 / (s0 + s1), 0.0]]))


def test_scaling_factor_multiplies_the_renormalised_probabilities():
    logits = torch.tensor([[0.0, 1.0, -2.0]])
    plain, _ = router_with_identity(3, 2, score="sigmoid")(logits)
    scaled, routing_map = router_with_identity(3, 2, score="sigmoid", scaling_factor=2.5)(logits)
    torch.testing.assert_close(scaled, 2.5 * plain)
    assert routing_map.tolist() == [[True, True, False]]
    with pytest.raises(MoEError, match=r"scaling_factor=0\.0: must be > 0"):
        TopKRouter(4, 2, 1, scaling_factor=0.0)


def test_load_balancing_loss_value_and_gradient():
    # Both tokens pick expert 0 (top-1): f = [1, 0], so loss = coeff * E * P_0 = coeff * (sig(1) + sig(2)).
    coeff = 0.1
    router = router_with_identity(2, 1, aux_loss_coeff=coeff)
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    probs, routing_map = router(x)
    sig = torch.sigmoid(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(router.aux_losses["load_balancing"], coeff * sig.sum())
    assert routing_map[:, 0].all()
    # With top-1 the chosen probability is always 1, so every gradient below comes from the aux loss.
    probs.sum().backward()
    d = coeff * sig * (1 - sig)
    torch.testing.assert_close(x.grad, torch.stack([d, -d], 1))


def test_z_loss_value_and_gradient():
    coeff = 0.01
    router = router_with_identity(3, 1, z_loss_coeff=coeff)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    x = logits.clone().requires_grad_()
    probs, _ = router(x)
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(router.aux_losses["z_loss"], coeff * (lse**2).mean())
    probs.sum().backward()
    expected = coeff * 2 * lse.unsqueeze(1) * torch.softmax(logits, -1) / 2
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_losses_backpropagate_as_if_added_to_the_loss(score):
    torch.manual_seed(0)
    options = {"score": score, "aux_loss_coeff": 0.3, "z_loss_coeff": 0.2, "aux_loss_scale": 0.5}
    router = TopKRouter(8, 4, 2, **options)
    x, c = torch.randn(10, 8, requires_grad=True), torch.randn(10, 4)
    probs, _ = router(x)
    (probs * c).sum().backward()
    plain = TopKRouter(8, 4, 2, score=score)
    with torch.no_grad():
        plain.weight.copy_(router.weight)
    x2 = x.detach().clone().requires_grad_()
    probs2, routing_map = plain(x2)
    logits = x2 @ plain.weight.t()
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    scores = scores / scores.sum(-1, keepdim=True)
    total = (probs2 * c).sum() + 0.5 * (
        aux_loss.load_balancing_loss(scores, routing_map, 2, 0.3) + aux_loss.z_loss(logits, 0.2)
    )
    total.backward()
    torch.testing.assert_close(probs, probs2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(router.weight.grad, plain.weight.grad)


def capacity_case(policy):
    # Four tokens, all routed (top-1) to expert 0 with probabilities 0.6, 0.9, 0.7, 0.8; capacity 2.
    router = router_with_identity(2, 1, pre_softmax=True, capacity_factor=1.0, drop_policy=policy)
    p = torch.tensor([0.6, 0.9, 0.7, 0.8])
    return router(torch.stack([p.log(), (1 - p).log()], 1)), p


def test_capacity_drops_the_lowest_probabilities():
    assert expert_capacity(4, 2, 1, 1.0) == 2
    (probs, routing_map), p = capacity_case("probs")
    assert routing_map[:, 0].tolist() == [False, True, False, True]
    assert not routing_map[:, 1].any()
    torch.testing.assert_close(probs[:, 0], p * torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_capacity_drops_the_latest_positions():
    (probs, routing_map), p = capacity_case("position")
    assert routing_map[:, 0].tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[:, 0], p * torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_expert_bias_changes_the_choice_but_not_the_probabilities():
    router = router_with_identity(3, 1, score="sigmoid", expert_bias=True)
    x = torch.tensor([[1.0, 0.5, 0.0]])
    assert router(x)[1].tolist() == [[True, False, False]]
    router.update_expert_bias(torch.tensor([10.0, 0.0, 2.0]), rate=0.5)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.5, 0.5, 0.5]))
    probs, routing_map = router(x)
    assert routing_map.tolist() == [[False, True, False]]
    # The probability is expert 1's own sigmoid score (not renormalised for top-1), without the bias.
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1 / (1 + math.exp(-0.5)), 0.0]]))


@pytest.mark.parametrize(
    ("args", "options", "field"),
    [
        ((8, 4, 5), {}, "topk=5"),
        ((8, 4, 0), {}, "topk=0"),
        ((8, 4, 2), {"score": "relu"}, "score='relu'"),
        ((8, 4, 2), {"score": "sigmoid", "pre_softmax": True}, "pre_softmax"),
        ((8, 4, 2), {"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ((8, 4, 2), {"drop_policy": "random"}, "drop_policy='random'"),
    ],
)
def test_bad_router_configurations_are_refused(args, options, field):
    with pytest.raises(MoEError, match=field):
        TopKRouter(*args, **options)


def test_update_expert_bias_needs_the_bias():
    with pytest.raises(MoEError, match="expert_bias=False"):
        TopKRouter(4, 2, 1).update_expert_bias(torch.zeros(2))
