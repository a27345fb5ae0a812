"""``GroupedExperts`` against a hand-written MLP, the expert-parallel tags, and construction errors."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dispatch import GroupedExperts, MoEError, MoELayer, expert_parallel_params, is_expert_parallel
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
