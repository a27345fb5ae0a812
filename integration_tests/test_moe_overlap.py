"""MoE all-to-all overlap through the pipeline executor: ``moe_dispatch``'s staged layers (``StagedStack``)
run by ``pp_sched.PipelineExecutor(overlap=True)`` on 1F1B's paired schedule (``build("1f1b", ...,
overlap=True)``), against the same schedule with ``overlap=False`` (whole chunks, synchronous all-to-alls).

Cases: EP=2 without pipeline (pp=1: F0, then (F1, B0), (F2, B1), ..., every steady-state forward
overlapped with the previous microbatch's backward) and PP=2 x EP=2 (world 4; every stage's EP pair
runs the same pairs). Each chunk is two residual MoE sublayers (``ResidualMoE``) with a shared expert.

Tolerance: torch's float32 defaults. With ``overlap=False`` each microbatch's backward is one autograd
graph; the staged run cuts it at the all-to-alls, which changes the order in which autograd adds the
gradient contributions of a tensor used in two places (the residual and the norm). The losses (forward
only) are compared bitwise.
"""

import pytest
import torch
from torch import nn

import pstate
from moe_dispatch import MoELayer, OverlapTimes, ResidualMoE, StagedStack
from pp_sched import PipelineExecutor, build

HIDDEN, FFN, EXPERTS, TOPK, SEQ, BATCH, MICROBATCHES = 16, 16, 4, 2, 6, 2, 4


def chunk(ps, stage):
    options = {"ep_group": ps.ep, "shared_ffn_hidden": FFN, "aux_loss_coeff": 0.01}
    layers = [ResidualMoE(MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=10 * stage + i, **options)) for i in range(2)]
    return StagedStack(layers, times=OverlapTimes())


def train(pp, ep, overlap):
    with pstate.initialize(pstate.ParallelConfig(pp=pp, ep=ep)) as ps:
        model = chunk(ps, ps.pp.rank)
        schedule = build("1f1b", pp=pp, microbatches=MICROBATCHES, overlap=True)
        executor = PipelineExecutor(
            schedule, [model], ps.pp, lambda out, y: nn.functional.mse_loss(out, y), overlap=overlap
        )
        g = torch.Generator().manual_seed(100 + ps.ep.rank)  # each EP rank its own tokens
        x = torch.randn(MICROBATCHES, SEQ, BATCH, HIDDEN, generator=g)
        y = torch.randn(MICROBATCHES, SEQ, BATCH, HIDDEN, generator=g)
        first, last = ps.pp.rank == 0, ps.pp.rank == pp - 1
        result = executor.step(list(x) if first else None, list(y) if last else None)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return result.losses, grads, model.times.exchanges


@pytest.mark.parametrize(("pp", "ep"), [(1, 2), (2, 2)], ids=["ep2", "pp2-ep2"])
def test_overlapped_1f1b_equals_the_plain_pipeline(run_ranks, pp, ep):
    on = run_ranks(pp * ep, train, pp, ep, True)
    off = run_ranks(pp * ep, train, pp, ep, False)
    for (losses, grads, exchanges), (losses_off, grads_off, exchanges_off) in zip(on, off):
        assert len(losses) == len(losses_off)
        for a, b in zip(losses, losses_off):
            assert torch.equal(a, b)
        assert grads.keys() == grads_off.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_off[name], msg=name)
        # Staged: 2 layers x 2 all-to-alls x (forward + backward) per microbatch; plain: none through it.
        assert exchanges == MICROBATCHES * 2 * 2 * 2 and exchanges_off == 0
