"""Each mapping's forward and backward at TP = 1, 2 and 4 against the collective it stands for,
written out on full tensors in one process.

Rank ``r`` feeds ``(r + 1) * X`` (or its slice of ``X``) and backpropagates ``(r + 1) * G``, so a sum
over ranks, a slice and a concatenation all give different answers and a wrong collective cannot pass.
"""

import pytest
import torch
import torch.distributed as dist

import tp_layers as tpl
from tp_layers import TensorParallelError

SHAPE = (8, 2, 12)  # [seq, batch, hidden]: divides over 1, 2 and 4 ranks on dims 0 and 2


def full_tensors():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)


def run_mapping(name):
    """On each rank: apply mapping ``name`` to this rank's input, backward this rank's gradient."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    x_full, g_full = full_tensors()
    scale = rank + 1.0
    inputs = {
        "copy_to_region": x_full,
        "reduce_from_region": scale * x_full,
        "scatter_to_region": x_full,
        "gather_from_region": x_full.chunk(tp, dim=-1)[rank],
        "scatter_to_sequence_region": x_full,
        "gather_from_sequence_region": x_full.chunk(tp, dim=0)[rank],
        "gather_from_sequence_region/no-reduce": x_full.chunk(tp, dim=0)[rank],
        "reduce_scatter_to_sequence_region": scale * x_full,
    }
    x = inputs[name].clone().requires_grad_()
    function, _, option = name.partition("/")
    kwargs = {"reduce_grad": False} if option == "no-reduce" else {}
    out = getattr(tpl, function)(x, group=dist.group.WORLD, **kwargs)
    grad = scale * g_full
    if out.shape != grad.shape:  # the output is a slice: backpropagate the matching slice
        dim = 0 if out.size(0) != grad.size(0) else -1
        grad = grad.chunk(tp, dim=dim)[rank]
    out.backward(grad)
    return out.detach(), x.grad


def expected(name, rank, tp):
    """The output and input gradient of rank ``rank``, from the full tensors."""
    x, g = full_tensors()
    scales = torch.arange(1.0, tp + 1)
    total = scales.sum()
    scale = scales[rank]

    def mine(t, dim):
        return t.chunk(tp, dim=dim)[rank]

    return {
        "copy_to_region": (x, total * g),
        "reduce_from_region": (total * x, scale * g),
        "scatter_to_region": (mine(x, -1), torch.cat([s * mine_g for s, mine_g in zip(scales, g.chunk(tp, -1))], -1)),
        "gather_from_region": (x, mine(scale * g, -1)),
        "scatter_to_sequence_region": (mine(x, 0), torch.cat([s * c for s, c in zip(scales, g.chunk(tp, 0))], 0)),
        "gather_from_sequence_region": (x, mine(total * g, 0)),
        "gather_from_sequence_region/no-reduce": (x, mine(scale * g, 0)),
        "reduce_scatter_to_sequence_region": (
            mine(total * x, 0),
            torch.cat([s * c for s, c in zip(scales, g.chunk(tp, 0))], 0),
        ),
    }[name]


MAPPINGS = [
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "gather_from_sequence_region/no-reduce",
    "reduce_scatter_to_sequence_region",
]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", MAPPINGS)
def test_forward_and_backward_match_the_collective(run_ranks, name, tp):
    for rank, (out, grad) in enumerate(run_ranks(tp, run_mapping, name)):
        want_out, want_grad = expected(name, rank, tp)
        torch.testing.assert_close(out, want_out, msg=lambda m, r=rank: f"{name} rank {r} output: {m}")
        torch.testing.assert_close(grad, want_grad, msg=lambda m, r=rank: f"{name} rank {r} grad: {m}")


def scatter_uneven(function, shape):
    try:
        getattr(tpl, function)(torch.zeros(shape), group=dist.group.WORLD)
    except TensorParallelError as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    ("function", "shape", "dim"),
    [
        ("scatter_to_region", (4, 2, 6), 2),
        ("scatter_to_sequence_region", (6, 2, 8), 0),
        ("reduce_scatter_to_sequence_region", (6, 2, 8), 0),
    ],
)
def test_sizes_that_do_not_divide_are_refused_with_the_dimension_named(run_ranks, function, shape, dim):
    for message in run_ranks(4, scatter_uneven, function, shape):
        assert message is not None, f"{function} accepted a dimension of size {shape[dim]} over 4 ranks"
        assert f"dimension {dim} of shape {shape} has size {shape[dim]}" in message
        assert "4 tensor-parallel ranks" in message


def gather_uneven(function, dim):
    shape = [4, 2, 4]
    shape[dim] = 3 if dist.get_rank() == 0 else 2
    try:
        getattr(tpl, function)(torch.zeros(shape), group=dist.group.WORLD)
    except TensorParallelError as error:
        return str(error)
    return None


@pytest.mark.parametrize(("function", "dim"), [("gather_from_region", 2), ("gather_from_sequence_region", 0)])
def test_a_gather_of_unequal_pieces_is_refused_on_every_rank(run_ranks, function, dim):
    for rank, message in enumerate(run_ranks(2, gather_uneven, function, dim)):
        assert message is not None, f"rank {rank} gathered unequal pieces"
        assert f"dimension {dim} has size {3 - rank} on this rank but sizes from 2 to 3" in message
