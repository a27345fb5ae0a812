"""``MoELayer`` in parallel against one process holding all experts.

World size = EP * ETP. Every rank feeds its own tokens (``data(rank)``) and backpropagates
``sum(y * c_rank)``. The reference is one ``MoELayer`` with ``ep_group=None`` built from the same seed,
run on each rank's tokens separately (the router's aux losses and capacity are per rank's batch in this
design): its outputs, input gradients and router gradients must equal that rank's, and its expert
gradients, summed over every rank's batch and sliced to a rank's experts (and ETP shard), must equal
that rank's. The slices of the reference's initial weights must equal the parallel weights exactly
(EP/ETP-invariant initialisation).

Tolerance: torch's float32 defaults (rtol 1.3e-6, atol 1e-5); the parallel run adds the same terms
in another order (reduce-scatter of partial sums, gradients of rows from several ranks).
"""

import pytest
import torch
import torch.distributed as dist

import pstate
from moe_dispatch import MoELayer, grouped_gemm

SEED, SEQ, BATCH, HIDDEN, FFN, EXPERTS, TOPK = 11, 5, 2, 8, 8, 4, 2
OPTIONS = {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001}


def data(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    return x, torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def build(topk, options, case, **groups):
    layer = MoELayer(HIDDEN, FFN, EXPERTS, topk, seed=SEED, **groups, **options)
    if case == "one_expert":  # every token to expert 2 (inputs are made positive below)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[2] = 1.0
    return layer


def inputs(rank, case):
    x, c = data(rank)
    return (x.abs() if case == "one_expert" else x).requires_grad_(), c


def run_parallel(dispatcher, ep, etp, topk, options, case):
    rank, state = dist.get_rank(), None
    if etp == 1:
        groups = {"ep_group": dist.group.WORLD}
    else:
        state = pstate.initialize(pstate.ParallelConfig(tp=etp, ep=ep, etp=etp))
        groups = {"ep_group": state.ep, "etp_group": state.etp}
    try:
        layer = build(topk, options, case, dispatcher=dispatcher, **groups)
        experts = layer.experts
        initial = experts.weight1.detach().clone(), experts.weight2.detach().clone()
        x, c = inputs(rank, case)
        y = layer(x)
        (y * c).sum().backward()
        etp_rank = dist.get_rank(state.etp.group) if state else 0
        return {
            "y": y.detach(),
            "x_grad": x.grad,
            "router_grad": layer.router.weight.grad,
            "w1": initial[0],
            "w2": initial[1],
            "w1_grad": experts.weight1.grad,
            "w2_grad": experts.weight2.grad,
            "first": experts.first_expert,
            "etp_rank": etp_rank,
            "tokens_per_expert": layer.tokens_per_expert,
            "local_tokens": layer.local_tokens_per_expert,
        }
    finally:
        if state is not None:
            state.destroy()


def reference(world, topk, options, case):
    layer = build(topk, options, case, ep_group=None)
    params = [layer.router.weight, layer.experts.weight1, layer.experts.weight2]
    per_rank, w1_grad, w2_grad = [], 0, 0
    for rank in range(world):
        x, c = inputs(rank, case)
        y = layer(x)
        gx, gr, g1, g2 = torch.autograd.grad((y * c).sum(), [x, *params])
        per_rank.append({"y": y.detach(), "x_grad": gx, "router_grad": gr, "tokens": layer.tokens_per_expert})
        w1_grad, w2_grad = w1_grad + g1, w2_grad + g2
    return layer, per_rank, w1_grad, w2_grad


def shard(w1, w2, first, local, q, etp):
    w1, w2 = w1[first : first + local], w2[first : first + local]
    gate, up = w1.chunk(2, 1)
    return torch.cat([gate.chunk(etp, 1)[q], up.chunk(etp, 1)[q]], 1), w2.chunk(etp, 2)[q]


def check(run_ranks, dispatcher, ep, etp, topk=TOPK, options=OPTIONS, case="random", reference_options=None):
    """Compare with the reference built with ``reference_options`` (default: the same ``options``)."""
    world = ep * etp
    results = run_ranks(world, run_parallel, dispatcher, ep, etp, topk, options, case)
    layer, per_rank, w1_grad, w2_grad = reference(world, topk, reference_options or options, case)
    local = EXPERTS // ep
    routed = torch.stack([r["tokens"] for r in per_rank])
    for rank, got in enumerate(results):
        want = per_rank[rank]
        torch.testing.assert_close(got["y"], want["y"])
        torch.testing.assert_close(got["x_grad"], want["x_grad"])
        torch.testing.assert_close(got["router_grad"], want["router_grad"])
        assert torch.equal(got["tokens_per_expert"], want["tokens"])
        first, q = got["first"], got["etp_rank"]
        w1, w2 = shard(layer.experts.weight1.detach(), layer.experts.weight2.detach(), first, local, q, etp)
        torch.testing.assert_close(got["w1"], w1, rtol=0, atol=0)
        torch.testing.assert_close(got["w2"], w2, rtol=0, atol=0)
        g1, g2 = shard(w1_grad, w2_grad, first, local, q, etp)
        torch.testing.assert_close(got["w1_grad"], g1)
        torch.testing.assert_close(got["w2_grad"], g2)
        # Rows per local expert: every rank's tokens routed there (all tokens of the ETP group's ranks).
        if not options.get("pad_to_capacity"):
            assert got["local_tokens"].tolist() == routed[:, first : first + local].sum(0).tolist()
    return results


DISPATCHERS = ["alltoall", "allgather"]


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize(("ep", "etp"), [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_moe_layer_equals_one_process_with_all_experts(run_ranks, dispatcher, ep, etp):
    check(run_ranks, dispatcher, ep, etp)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize(("ep", "etp"), [(2, 1), (2, 2)])
def test_the_expert_loop_equals_one_process_too(run_ranks, dispatcher, ep, etp):
    # The sizes above are aligned for the grouped GEMM, so "auto" takes it; the loop is checked here.
    check(run_ranks, dispatcher, ep, etp, options={**OPTIONS, "gemm": "loop"})


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize(("ep", "etp"), [(2, 1), (2, 2)])
def test_capacity_dropping_equals_one_process(run_ranks, dispatcher, policy, ep, etp):
    options = {**OPTIONS, "capacity_factor": 0.75, "drop_policy": policy}
    results = check(run_ranks, dispatcher, ep, etp, options=options)
    capacity = 4  # ceil(10 tokens * 2 / 4 experts * 0.75): 16 of the 20 routing slots at most survive
    for r in results:
        assert r["tokens_per_expert"].max() <= capacity
        assert r["tokens_per_expert"].sum() < SEQ * BATCH * TOPK


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize(
    "gemm",
    [pytest.param("grouped", marks=pytest.mark.skipif(not grouped_gemm.available(), reason="no grouped_mm")), "loop"],
)
@pytest.mark.parametrize(("ep", "etp"), [(2, 1), (2, 2)])
def test_padding_to_capacity_changes_nothing_but_the_shapes(run_ranks, dispatcher, gemm, ep, etp):
    # The reference drops the same tokens and does not pad: padding rows must add nothing anywhere.
    dropping = {**OPTIONS, "capacity_factor": 0.75, "drop_policy": "probs"}
    options = {**dropping, "pad_to_capacity": True, "gemm": gemm}
    results = check(run_ranks, dispatcher, ep, etp, options=options, reference_options=dropping)
    capacity = 4  # ceil(10 tokens * 2 / 4 experts * 0.75)
    for r in results:
        # Static shapes: every local expert gets exactly `capacity` rows from each of the ep * etp ranks.
        assert r["local_tokens"].tolist() == [ep * etp * capacity] * (EXPERTS // ep)
    # Some expert is under capacity, so some rows are padding (check() saw the unpadded token counts).
    assert any(r["tokens_per_expert"].min() < capacity for r in results)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_group_limited_routing_equals_one_process(run_ranks, dispatcher):
    # One group of experts per EP rank, one group per token: each token's rows go to one rank only.
    options = {**OPTIONS, "score": "sigmoid", "num_groups": 2, "topk_groups": 1, "expert_bias": True}
    results = check(run_ranks, dispatcher, 2, 1, options=options)
    assert all(r["tokens_per_expert"].sum() == SEQ * BATCH * TOPK for r in results)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize(("ep", "etp"), [(4, 1), (2, 2)])
def test_every_token_to_one_expert_and_zero_tokens_elsewhere(run_ranks, dispatcher, ep, etp):
    results = check(run_ranks, dispatcher, ep, etp, topk=1, case="one_expert")
    for r in results:
        assert r["tokens_per_expert"].tolist() == [0, 0, SEQ * BATCH, 0]
    # Ranks that do not hold expert 2 receive no rows at all.
    assert sum(r["local_tokens"].sum().item() == 0 for r in results) == len(results) - etp


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize(
    "options",
    [
        {**OPTIONS, "score": "sigmoid", "activation": "gelu"},
        {**OPTIONS, "pre_softmax": True, "expert_bias": True},
    ],
    ids=["sigmoid-gelu", "pre-softmax-bias"],
)
def test_other_router_and_expert_options_equal_one_process(run_ranks, dispatcher, options):
    check(run_ranks, dispatcher, 2, 1, options=options)
