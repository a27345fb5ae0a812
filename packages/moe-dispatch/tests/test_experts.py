"""``GroupedExperts`` against a hand-written MLP and the grouped GEMM against the loop, the expert tags, and
construction errors. Tolerances: torch's float32 defaults (the same products summed in other orders);
bfloat16 at 2e-2 (8 bits of mantissa)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dispatch import GroupedExperts, MoEError, MoELayer, expert_parallel_params, grouped_gemm, is_expert_parallel
from tp_layers import tensor_parallel_dim


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_each_expert_is_a_two_layer_mlp_on_its_rows(activation):
    experts = GroupedExperts(3, 4, 6, activation=activation, first_expert=2, seed=5)
    x, counts = torch.randn(7, 4), [3, 0, 4]
    y = experts(x, torch.tensor(counts))
    pieces = []
    for i, rows in enumerate(x.split(counts)):
        h = rows @ experts.weight1[i].t()
        h = F.silu(h[:, :6]) * h[:, 6:] if activation == "swiglu" else F.gelu(h)
        pieces.append(h @ experts.weight2[i].t())
    torch.testing.assert_close(y, torch.cat(pieces))


def test_an_expert_has_the_same_weights_wherever_it_lives():
    all_four = GroupedExperts(4, 4, 6, seed=5)
    last_two = GroupedExperts(2, 4, 6, first_expert=2, seed=5)
    assert torch.equal(all_four.weight1[2:], last_two.weight1)
    assert torch.equal(all_four.weight2[2:], last_two.weight2)


def test_exactly_the_expert_parameters_are_tagged():
    layer = MoELayer(4, 6, 4, 2, ep_group=None)
    tagged = {name for name, p in layer.named_parameters() if is_expert_parallel(p)}
    assert tagged == {"experts.weight1", "experts.weight2"}
    assert set(expert_parallel_params(layer)) == {layer.experts.weight1, layer.experts.weight2}
    assert tensor_parallel_dim(layer.experts.weight1) == 1 and tensor_parallel_dim(layer.experts.weight2) == 2
    assert tensor_parallel_dim(layer.router.weight) is None


def test_rows_must_match_the_counts():
    with pytest.raises(MoEError, match="summing to the 5 input rows"):
        GroupedExperts(2, 4, 6)(torch.randn(5, 4), [1, 2])


def test_bad_single_process_configurations_are_refused():
    with pytest.raises(MoEError, match="topk=5"):
        MoELayer(4, 6, 4, 5, ep_group=None)
    with pytest.raises(MoEError, match="activation='relu'"):
        MoELayer(4, 6, 4, 2, ep_group=None, activation="relu")
    with pytest.raises(MoEError, match="dispatcher='ring'"):
        MoELayer(4, 6, 4, 2, ep_group=None, dispatcher="ring")


def bad_parallel_configuration(field):
    try:
        if field == "experts":
            MoELayer(4, 6, 3, 1, ep_group=dist.group.WORLD)
        else:
            MoELayer(4, 5, 4, 1, ep_group=None, etp_group=dist.group.WORLD)
    except MoEError as error:
        return str(error)
    return None


def test_bad_parallel_configurations_are_refused(run_ranks):
    assert (
        run_ranks(2, bad_parallel_configuration, "experts")
        == ["num_experts=3: must be a positive multiple of the expert-parallel size 2"] * 2
    )
    assert (
        run_ranks(2, bad_parallel_configuration, "ffn")
        == ["ffn_hidden=5: must be divisible by the expert-tensor-parallel size 2"] * 2
    )


needs_grouped_mm = pytest.mark.skipif(not grouped_gemm.available(), reason="torch has no grouped_mm")


def twin_experts(gemm, activation, dtype=torch.float32):
    return GroupedExperts(3, 16, 24, activation=activation, seed=7, gemm=gemm, dtype=dtype)


@needs_grouped_mm
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[5, 0, 6], [0, 11, 0], [0, 0, 0], [4, 4, 3]])
def test_grouped_gemm_equals_the_loop_with_gradients(activation, counts):
    # float32: both paths sum the same products per output element; torch's defaults allow the
    # different blocking of the CPU kernels.
    loop, grouped = twin_experts("loop", activation), twin_experts("grouped", activation)
    assert grouped.uses_grouped_gemm() and not loop.uses_grouped_gemm()
    x, c = torch.randn(sum(counts), 16), torch.randn(sum(counts), 16)
    results = []
    for experts in (loop, grouped):
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        (y * c).sum().backward()
        results.append((y.detach(), xi.grad, experts.weight1.grad, experts.weight2.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want)


@needs_grouped_mm
def test_grouped_gemm_in_bfloat16_stays_close_to_the_float32_loop():
    # bfloat16 keeps 8 bits of mantissa: compare with the float32 loop at bfloat16's tolerance.
    loop, grouped = twin_experts("loop", "swiglu"), twin_experts("grouped", "swiglu", torch.bfloat16)
    x, counts = torch.randn(12, 16), [3, 9, 0]
    torch.testing.assert_close(grouped(x.bfloat16(), counts).float(), loop(x, counts), rtol=2e-2, atol=2e-2)


@needs_grouped_mm
def test_auto_falls_back_to_the_loop_and_grouped_refuses_what_torch_cannot_run():
    # 6 * 4 bytes is not a multiple of 16: grouped_mm's stride rule.
    assert not GroupedExperts(2, 4, 6).uses_grouped_gemm()
    assert GroupedExperts(2, 8, 8).uses_grouped_gemm()
    assert not GroupedExperts(2, 8, 8, dtype=torch.float64).uses_grouped_gemm()
    with pytest.raises(MoEError, match=r"gemm='grouped': grouped_mm needs feature sizes that are multiples of 4"):
        GroupedExperts(2, 4, 6, gemm="grouped")
    with pytest.raises(MoEError, match="gemm='fast'"):
        GroupedExperts(2, 8, 8, gemm="fast")
