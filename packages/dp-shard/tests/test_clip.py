"""``clip_grad_norm_`` over TP/PP-split parameters against ``torch.nn.utils.clip_grad_norm_`` on the full ones.

A small model's full gradients are drawn in every process from one seed. Each rank holds the parameters
of its pipeline stage; those tagged ``tensor_parallel_dim`` hold their TP slice of the gradient, the
others (a bias and a norm weight) the whole of it, replicated over TP; DP replicas hold the same.
The norm and the clipped gradients must equal the full model's. Tolerance: the float32 default; the
squared sums are added in another order.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pstate
from dp_shard import DataParallelError, clip_grad_norm_
from pstate.tags import mark_expert_parallel, mark_tensor_parallel, mark_tied_copy

# name: (shape, TP-split dim or None, pipeline stage when pp=2)
SPEC = {
    "w1": ((8, 6), 0, 0),
    "b1": ((8,), 0, 0),
    "norm": ((6,), None, 0),
    "w2": ((5, 8), 1, 1),
    "b2": ((5,), None, 1),
}


def full_grads(bad=None):
    generator = torch.Generator().manual_seed(3)
    grads = {name: torch.randn(shape, generator=generator) for name, (shape, _, _) in SPEC.items()}
    if bad is not None:
        grads["w2"][0, 1] = bad
    return grads


def reference(max_norm, norm_type, bad=None):
    params = []
    for grad in full_grads(bad).values():
        param = nn.Parameter(torch.zeros_like(grad))
        param.grad = grad
        params.append(param)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    return norm, dict(zip(SPEC, (p.grad for p in params)))


def clip_on_ranks(tp, pp, max_norm, norm_type, bad=None, error_if_nonfinite=False):
    with pstate.initialize(pstate.ParallelConfig(tp=tp, pp=pp)) as ps:
        params = {}
        for name, grad in full_grads(bad).items():
            _, dim, stage = SPEC[name]
            if pp > 1 and stage != ps.pp.rank:
                continue
            grad = grad if dim is None else grad.chunk(tp, dim)[ps.tp.rank].clone()
            param = nn.Parameter(torch.zeros_like(grad))
            param.grad = grad
            if dim is not None:
                param.tensor_parallel_dim = dim
            params[name] = param
        try:
            norm = clip_grad_norm_(
                list(params.values()),
                max_norm,
                norm_type=norm_type,
                tp_group=ps.tp,
                pp_group=ps.pp,
                error_if_nonfinite=error_if_nonfinite,
            )
        except DataParallelError as error:
            return str(error)
        return norm, {name: p.grad for name, p in params.items()}, ps.tp.rank


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)], ids=["tp2-dp2", "pp2-dp2", "tp2-pp2"])
def test_global_norm_equals_the_full_model(run_ranks, tp, pp, max_norm, norm_type):
    norm, clipped = reference(max_norm, norm_type)
    for got_norm, grads, tp_rank in run_ranks(4, clip_on_ranks, tp, pp, max_norm, norm_type):
        torch.testing.assert_close(got_norm, norm)
        for name, grad in grads.items():
            dim = SPEC[name][1]
            torch.testing.assert_close(grad, clipped[name] if dim is None else clipped[name].chunk(tp, dim)[tp_rank])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_norm_is_returned_and_gradients_left_alone(run_ranks, bad):
    unclipped = full_grads(bad)
    for norm, grads, tp_rank in run_ranks(4, clip_on_ranks, 2, 2, 0.5, 2.0, bad):
        assert math.isinf(norm.item()) if bad == math.inf else math.isnan(norm.item())
        for name, grad in grads.items():
            dim = SPEC[name][1]
            expected = unclipped[name] if dim is None else unclipped[name].chunk(2, dim)[tp_rank]
            torch.testing.assert_close(grad, expected, equal_nan=True)


def test_error_if_nonfinite_raises_on_every_rank(run_ranks):
    for message in run_ranks(4, clip_on_ranks, 2, 2, 0.5, 2.0, math.nan, True):
        assert isinstance(message, str) and "not finite" in message


def test_single_process_matches_torch_and_prefers_main_grad():
    norm, clipped = reference(0.5, 2.0)
    params = []
    for grad in full_grads().values():
        param = nn.Parameter(torch.zeros_like(grad, dtype=torch.bfloat16))
        param.main_grad = grad.clone()  # what DataParallel sets; .grad stays None under mixed precision
        params.append(param)
    got = clip_grad_norm_(params + params[:2], 0.5)  # a parameter listed twice counts once
    torch.testing.assert_close(got, norm)
    for param, name in zip(params, SPEC):
        torch.testing.assert_close(param.main_grad, clipped[name])
    with pytest.raises(DataParallelError, match="norm_type=0"):
        clip_grad_norm_(params, 1.0, norm_type=0)


def clip_dense_and_experts():
    """World 4 = tp 2 x ep 2 (etp = tp): a TP-split and a replicated dense weight, and two experts,
    one per EP rank, each split over ETP. Returns the norm and the clipped gradients' pieces."""
    rank = dist.get_rank()
    tp_rank, ep_rank = rank % 2, rank // 2
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])][ep_rank]
    ep = [dist.new_group([0, 2]), dist.new_group([1, 3])][tp_rank]
    full = reference_tensors()
    split = mark_tensor_parallel(torch.nn.Parameter(full["split"].chunk(2)[tp_rank].clone()), 0)
    shared = torch.nn.Parameter(full["shared"].clone())
    expert = mark_expert_parallel(
        mark_tensor_parallel(torch.nn.Parameter(full["experts"][ep_rank].chunk(2, 0)[tp_rank].clone()), 0)
    )
    for p in (split, shared, expert):
        p.grad = p.detach().clone()
    norm = clip_grad_norm_([split, shared, expert], 1.0, tp_group=tp, ep_group=ep, etp_group=tp)
    return norm.item(), expert.grad.clone()


def reference_tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "split": torch.randn(4, 3, generator=g),
        "shared": torch.randn(3, generator=g),
        "experts": torch.randn(2, 4, 3, generator=g),
    }


def test_dense_and_expert_parameters_in_one_call(run_ranks):
    full = reference_tensors()
    total = torch.sqrt(sum(t.pow(2).sum() for t in full.values())).item()
    results = run_ranks(4, clip_dense_and_experts)
    for rank, (norm, expert_grad) in enumerate(results):
        assert norm == pytest.approx(total, rel=1e-6)
        piece = full["experts"][rank // 2].chunk(2, 0)[rank % 2]
        torch.testing.assert_close(expert_grad, piece / (total + 1e-6))


def clip_tied_copy():
    """Two pipeline stages each hold one weight and the same tied tensor; the last stage's copy is tagged
    as such. Returns the norm and both of this rank's clipped gradients."""
    rank = dist.get_rank()
    pp = dist.new_group([0, 1])
    full = reference_tensors()
    own = torch.nn.Parameter(full["experts"][rank].clone())
    tied = torch.nn.Parameter(full["split"].clone())
    if rank == 1:
        mark_tied_copy(tied)
    for p in (own, tied):
        p.grad = p.detach().clone()
    norm = clip_grad_norm_([own, tied], 1.0, pp_group=pp)
    return norm.item(), own.grad.clone(), tied.grad.clone()


def test_a_tied_copy_is_clipped_but_counted_once(run_ranks):
    full = reference_tensors()
    total = math.sqrt(sum(t.pow(2).sum().item() for t in (full["experts"], full["split"])))
    for rank, (norm, own, tied) in enumerate(run_ranks(2, clip_tied_copy)):
        assert norm == pytest.approx(total, rel=1e-6)
        torch.testing.assert_close(own, full["experts"][rank] / (total + 1e-6))
        torch.testing.assert_close(tied, full["split"] / (total + 1e-6))  # the copy scaled like the original
