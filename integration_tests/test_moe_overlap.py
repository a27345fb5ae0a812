"""MoE all-to-all overlap through the pipeline executor: ``moe_dispatch``'s staged layers (``StagedStack``)
run by ``pp_sched.PipelineExecutor(overlap=True)`` on the schedules with pairs (``build("1f1b", ...,
overlap=True)``, DualPipe-V), against the same schedule with ``overlap=False`` (whole chunks, synchronous
all-to-alls).

Cases: EP=2 without pipeline (pp=1: F0, then (F1, B0), (F2, B1), ..., every steady-state forward
overlapped with the previous microbatch's backward), PP=2 x EP=2 (world 4; every stage's EP pair runs
the same pairs), and DualPipe-V's own pairs at PP=2 x EP=2 (two chunks per rank in a V; its unpaired
backwards, split into ``I`` and ``W`` when run plain, run whole with overlap). Each chunk is two
residual MoE sublayers (``ResidualMoE``) with a shared expert.

Tolerance: torch's float32 defaults. With ``overlap=False`` each microbatch's backward is one autograd
graph; the staged run cuts it at the all-to-alls, which changes the order in which autograd adds the
gradient contributions of a tensor used in two places (the residual and the norm), and DualPipe-V's
weight gradients are added in another order (whole backwards instead of deferred ``W``). The losses
(forward only) are compared bitwise.
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


def train(pp, ep, overlap, name="1f1b"):
    with pstate.initialize(pstate.ParallelConfig(pp=pp, ep=ep)) as ps:
        schedule = build(name, pp=pp, microbatches=MICROBATCHES, overlap=True)
        stages = [schedule.stage_of(ps.pp.rank, c) for c in range(schedule.vpp)]
        models = [chunk(ps, stage) for stage in stages]
        executor = PipelineExecutor(
            schedule, models, ps.pp, lambda out, y: nn.functional.mse_loss(out, y), overlap=overlap
        )
        g = torch.Generator().manual_seed(100 + ps.ep.rank)  # each EP rank its own tokens
        x = torch.randn(MICROBATCHES, SEQ, BATCH, HIDDEN, generator=g)
        y = torch.randn(MICROBATCHES, SEQ, BATCH, HIDDEN, generator=g)
        first = schedule.rank_of(0) == ps.pp.rank
        last = schedule.rank_of(schedule.num_stages - 1) == ps.pp.rank
        result = executor.step(list(x) if first else None, list(y) if last else None)
        grads = {f"{c}.{n}": p.grad.clone() for c, m in enumerate(models) for n, p in m.named_parameters()}
        return result.losses, grads, sum(m.times.exchanges for m in models)


CASES = {"ep2": (1, 2, "1f1b"), "pp2-ep2": (2, 2, "1f1b"), "dualpipe-v-pp2-ep2": (2, 2, "dualpipe-v")}


@pytest.mark.parametrize(("pp", "ep", "name"), list(CASES.values()), ids=list(CASES))
def test_overlapped_pairs_equal_the_plain_pipeline(run_ranks, pp, ep, name):
    on = run_ranks(pp * ep, train, pp, ep, True, name)
    off = run_ranks(pp * ep, train, pp, ep, False, name)
    for (losses, grads, exchanges), (losses_off, grads_off, exchanges_off) in zip(on, off):
        assert len(losses) == len(losses_off)
        for a, b in zip(losses, losses_off):
            assert torch.equal(a, b)
        assert grads.keys() == grads_off.keys()
        for key, g in grads.items():
            torch.testing.assert_close(g, grads_off[key], msg=key)
        # Staged: 2 layers x 2 all-to-alls x (forward + backward) per microbatch and chunk; plain: none.
        chunks = 2 if name == "dualpipe-v" else 1
        assert exchanges == chunks * MICROBATCHES * 2 * 2 * 2 and exchanges_off == 0
