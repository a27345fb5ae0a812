"""Expert parameters reduce their gradients over the expert-data-parallel group (``edp``), dense ones over
``dp``: the contract between ``moe-dispatch`` (which tags expert parameters), ``pstate`` (which builds both
groups) and the data-parallel reduction (``dp-shard`` / ``trainer``).

On 4 ranks with dense ``dp = 4`` and ``edp = 2`` (EP=2, or EP=1 with ETP=2: the case the issue singles out
as a source of wrong gradients elsewhere), every rank trains on its own tokens with loss
``sum(y * c) / dp``. Summing each gradient over its group must give the gradient of the single process
holding all experts over all four batches. Reducing the expert gradients over ``dp`` instead sums slices
of *different* experts or ETP shards, and the test shows that this is caught.

Tolerance: torch's float32 defaults; the sums run in another order.
"""

import pytest
import torch
import torch.distributed as dist

import pstate
from dp_shard import DataParallel, DataParallelError
from moe_dispatch import MoELayer, is_expert_parallel

SEED, SEQ, BATCH, HIDDEN, FFN, EXPERTS, TOPK, WORLD = 5, 4, 2, 8, 8, 4, 2, 4


def data(rank):
    generator = torch.Generator().manual_seed(200 + rank)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator), torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def run_data_parallel(config, expert_axis):
    with pstate.initialize(config) as ps:
        assert ps.dp.size == WORLD and ps.edp.size == 2
        layer = MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=SEED, ep_group=ps.ep, etp_group=ps.etp)
        x, c = data(dist.get_rank())
        ((layer(x) * c).sum() / ps.dp.size).backward()
        for param in layer.parameters():
            axis = getattr(ps, expert_axis) if is_expert_parallel(param) else ps.dp
            dist.all_reduce(param.grad, group=axis.group)
        tagged = sorted(name for name, p in layer.named_parameters() if is_expert_parallel(p))
        return {**gradients(layer, ps), "tagged": tagged}


def gradients(layer, ps):
    """This rank's router and expert gradients, and where its experts sit in the full layer."""
    experts = layer.experts
    return {
        "router": layer.router.weight.grad,
        "w1": experts.weight1.grad,
        "w2": experts.weight2.grad,
        "first": experts.first_expert,
        "local": experts.weight1.size(0),
        "etp": (ps.etp.rank, ps.etp.size),
    }


def reference():
    layer = MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=SEED)
    params = [layer.router.weight, layer.experts.weight1, layer.experts.weight2]
    total = [torch.zeros_like(p) for p in params]
    for rank in range(WORLD):
        x, c = data(rank)
        grads = torch.autograd.grad((layer(x) * c).sum() / WORLD, params)
        total = [t + g for t, g in zip(total, grads)]
    return total


def expert_slice(w1, w2, first, local, etp_rank, etp):
    """A rank's part of the full expert weights: its experts, and its ETP shard of each (SwiGLU's fc1 is
    stored ``[gate; up]``, each half split over ETP)."""
    w1, w2 = w1[first : first + local], w2[first : first + local]
    gate, up = w1.chunk(2, 1)
    return torch.cat([gate.chunk(etp, 1)[etp_rank], up.chunk(etp, 1)[etp_rank]], 1), w2.chunk(etp, 2)[etp_rank]


CONFIGS = {"ep2": pstate.ParallelConfig(ep=2), "etp2-ep1": pstate.ParallelConfig(etp=2)}


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_expert_grads_summed_over_edp_equal_the_single_process_gradients(run_ranks, layout):
    router, w1, w2 = reference()
    for got in run_ranks(WORLD, run_data_parallel, CONFIGS[layout], "edp"):
        assert got["tagged"] == ["experts.weight1", "experts.weight2"]
        torch.testing.assert_close(got["router"], router)
        want1, want2 = expert_slice(w1, w2, got["first"], got["local"], *got["etp"])
        torch.testing.assert_close(got["w1"], want1)
        torch.testing.assert_close(got["w2"], want2)


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_reducing_expert_grads_over_dp_is_wrong_and_caught(run_ranks, layout):
    _, w1, w2 = reference()
    results = run_ranks(WORLD, run_data_parallel, CONFIGS[layout], "dp")
    wrong = [
        not torch.allclose(got["w1"], expert_slice(w1, w2, got["first"], got["local"], *got["etp"])[0])
        for got in results
    ]
    assert all(wrong)


def run_wrapped(config):
    """The same through ``dp_shard.DataParallel``: loss is this rank's sum, averaging is the wrapper's."""
    with pstate.initialize(config) as ps:
        layer = MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=SEED, ep_group=ps.ep, etp_group=ps.etp)
        try:
            DataParallel(layer, group=ps.dp)
            refused = None
        except DataParallelError as error:
            refused = str(error)
        model = DataParallel(layer, group=ps.dp, expert_group=ps.edp, bucket_size_mb=1e-4)  # several buckets
        x, c = data(dist.get_rank())
        (model(x) * c).sum().backward()
        model.finish_grad_sync()
        return {**gradients(layer, ps), "refused": refused}


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_data_parallel_reduces_expert_grads_over_its_expert_group(run_ranks, layout):
    router, w1, w2 = reference()
    for got in run_ranks(WORLD, run_wrapped, CONFIGS[layout]):
        assert "expert parameters (e.g. 'experts.weight1') need expert_group=" in got["refused"]
        torch.testing.assert_close(got["router"], router)
        want1, want2 = expert_slice(w1, w2, got["first"], got["local"], *got["etp"])
        torch.testing.assert_close(got["w1"], want1)
        torch.testing.assert_close(got["w2"], want2)
