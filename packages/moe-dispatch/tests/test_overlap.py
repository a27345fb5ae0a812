"""All-to-all overlap (:mod:`moe_dispatch.overlap`): two microbatches interleaved give what running them one
after the other gives.

A stack of two layers (a dense residual MLP, split over TP with sequence parallelism when TP > 1, then a
residual MoE layer with a shared expert) runs two microbatches A and B four ways on the same ranks:

- ``plain``: ``stack(x)`` and ``backward()`` per microbatch (one autograd graph, synchronous all-to-alls);
- ``staged``: the same cut into pieces (:class:`~moe_dispatch.StagedRun`), each run alone: F(A) B(A) F(B) B(B);
- ``ff``: the forwards of A and B interleaved, then their backwards interleaved;
- ``fb``: F(A), then F(B) interleaved with B(A) (1F1B's steady state), then B(B).

``ff`` and ``fb`` must equal ``staged`` bitwise: interleaving changes only when each operation runs,
not what it computes, and every parameter receives A's gradient before B's in all three (the round
robin advances A first, and A and B run the same pieces). ``staged`` must equal ``plain`` within torch's
float32 tolerances: cutting the graph changes the order in which autograd adds the gradient
contributions of a tensor used in two places (the residual and the norm; the router and the shared
expert). Outputs, losses, the inputs' and every parameter's gradients are compared on every rank.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pstate
from moe_dispatch import MoELayer, OverlapTimes, ResidualMoE, StagedStack, interleave
from moe_dispatch.overlap import run
from tp_layers import ColumnParallelLinear, RowParallelLinear

SEQ, BATCH, HIDDEN, FFN, EXPERTS, TOPK = 8, 2, 16, 16, 4, 2


class DenseBlock(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``, fc1 column- and fc2 row-parallel over ``tp`` (sequence parallel)."""

    def __init__(self, tp, sp, seed):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        g = torch.Generator().manual_seed(seed)
        full1, full2 = torch.randn(FFN, HIDDEN, generator=g) / 4, torch.randn(HIDDEN, FFN, generator=g) / 4
        self.fc1 = ColumnParallelLinear(HIDDEN, FFN, group=tp, sequence_parallel=sp, full_weight=full1)
        self.fc2 = RowParallelLinear(FFN, HIDDEN, group=tp, sequence_parallel=sp, full_weight=full2)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def build(ps, tp):
    groups = {"ep_group": ps.ep if ps else None}
    if tp > 1:
        groups.update(etp_group=ps.etp, tp_group=ps.tp, sequence_parallel=True, aux_loss_group=ps.tp)
    moe = MoELayer(
        HIDDEN, FFN, EXPERTS, TOPK, seed=5, shared_ffn_hidden=FFN, aux_loss_coeff=0.01, z_loss_coeff=0.001, **groups
    )
    return StagedStack([DenseBlock(ps.tp, tp > 1, 3), ResidualMoE(moe)], times=OverlapTimes())


def data(microbatch, tp):
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + microbatch)
    x = torch.randn(SEQ // tp, BATCH, HIDDEN, generator=g)
    return x, torch.randn(SEQ // tp, BATCH, HIDDEN, generator=g)


def run_ways(tp, ep, etp):
    ps = pstate.initialize(pstate.ParallelConfig(tp=tp, ep=ep, etp=etp))
    try:
        stack = build(ps, tp)
        batches = [data(mb, tp) for mb in range(2)]
        results = {}
        for way in ("plain", "staged", "ff", "fb"):
            stack.zero_grad(set_to_none=True)
            xs = [x.clone().requires_grad_() for x, _ in batches]
            results[way] = run_way(stack, way, xs, [c for _, c in batches])
            results[way]["x_grads"] = [x.grad for x in xs]
            results[way]["grads"] = {n: p.grad.clone() for n, p in stack.named_parameters()}
        return results, stack.times.as_dict()
    finally:
        ps.destroy()


def run_way(stack, way, xs, cs):
    losses = []
    if way == "plain":
        for x, c in zip(xs, cs):
            loss = (stack(x) * c).sum()
            loss.backward()
            losses.append(loss.detach())
        return {"losses": losses}
    runs = [stack.staged_run() for _ in xs]

    def backward(k):
        (y,) = runs[k].outputs
        loss = (y * cs[k]).sum()
        losses.append(loss.detach())
        return runs[k].backward([loss], [None])

    if way == "staged":
        for k in range(2):
            run(runs[k].forward(xs[k]))
            run(backward(k))
    elif way == "ff":
        interleave(runs[0].forward(xs[0]), runs[1].forward(xs[1]))
        interleave(backward(0), backward(1))
    else:
        run(runs[0].forward(xs[0]))
        b0 = backward(0)  # the loss of A is taken before F(B) starts, as an executor would
        interleave(runs[1].forward(xs[1]), b0)
        run(backward(1))
    return {"losses": losses}


CASES = {"ep2": (1, 2, 1), "ep2-tp2-sp": (2, 2, 2), "ep2-tp2-sp-etp1": (2, 2, 1)}


@pytest.mark.parametrize(("tp", "ep", "etp"), list(CASES.values()), ids=list(CASES))
def test_overlap_on_and_off_give_the_same_losses_and_gradients(run_ranks, tp, ep, etp):
    for results, times in run_ranks(tp * ep, run_ways, tp, ep, etp):
        plain, staged = results["plain"], results["staged"]
        for way in ("ff", "fb"):
            got = results[way]
            for a, b in zip(got["losses"], staged["losses"]):
                assert torch.equal(a, b), way
            for a, b in zip(got["x_grads"], staged["x_grads"]):
                assert torch.equal(a, b), way
            assert got["grads"].keys() == staged["grads"].keys()
            for name, g in got["grads"].items():
                assert torch.equal(g, staged["grads"][name]), (way, name)
        for a, b in zip(staged["losses"], plain["losses"]):
            torch.testing.assert_close(a, b)
        for a, b in zip(staged["x_grads"], plain["x_grads"]):
            torch.testing.assert_close(a, b)
        for name, g in staged["grads"].items():
            torch.testing.assert_close(g, plain["grads"][name], msg=name)
        # Three staged ways, two microbatches, one MoE layer: two all-to-alls forward and two backward each.
        assert times["exchanges"] == 3 * 2 * 4


def test_only_the_all_to_all_dispatcher_is_cut():
    from moe_dispatch import MoEError

    with pytest.raises(MoEError, match="dispatcher='alltoall'"):
        MoELayer(HIDDEN, FFN, EXPERTS, TOPK, dispatcher="allgather", seed=5).stages()
