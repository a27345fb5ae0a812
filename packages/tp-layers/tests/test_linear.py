"""``ColumnParallelLinear`` and ``RowParallelLinear`` against ``nn.Linear`` on the full tensors.

The parallel layers are built after ``torch.manual_seed(SEED)`` on every rank and the reference
``nn.Linear`` after the same call in this process, so the comparison also proves TP-invariant
initialisation. Each rank backpropagates ``sum(y * C)`` for its part of ``y`` (``C`` fixed); the shards
it returns are put together here and compared with the reference's output and gradients.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5); the parallel sums add the
same products in another order, which changes only the last bits.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pstate.comm import CommRecorder
from pstate.testing import error_messages
from tp_layers import ColumnParallelLinear, RowParallelLinear, TensorParallelError, allreduce_sequence_parallel_grads

SEED, SEQ, BATCH, IN, OUT = 1234, 8, 2, 16, 24


def data():
    generator = torch.Generator().manual_seed(7)
    return torch.randn(SEQ, BATCH, IN, generator=generator), torch.randn(SEQ, BATCH, OUT, generator=generator)


def reference(in_features=IN, out_features=OUT):
    torch.manual_seed(SEED)
    linear = nn.Linear(in_features, out_features)
    x, c = data()
    x = x[..., :in_features].clone().requires_grad_()
    y = linear(x)
    (y * c[..., :out_features]).sum().backward()
    return y.detach(), x.grad, linear.weight.grad, linear.bias.grad, linear.weight.detach(), linear.bias.detach()


def run_column(sequence_parallel, gather_output):
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    layer = ColumnParallelLinear(
        IN, OUT, group=dist.group.WORLD, gather_output=gather_output, sequence_parallel=sequence_parallel
    )
    x_full, c = data()
    x = (x_full.chunk(tp, 0)[rank] if sequence_parallel else x_full).clone().requires_grad_()
    initial = layer.weight.detach().clone(), layer.bias.detach().clone()
    y = layer(x)
    (y * (c if gather_output else c.chunk(tp, -1)[rank])).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, *initial


@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_equals_nn_linear(run_ranks, tp, sequence_parallel, gather_output):
    y, x_grad, w_grad, b_grad, weight, bias = reference()
    results = run_ranks(tp, run_column, sequence_parallel, gather_output)
    for rank, (y_r, x_grad_r, w_grad_r, b_grad_r, weight_r, bias_r) in enumerate(results):
        torch.testing.assert_close(weight_r, weight.chunk(tp, 0)[rank], rtol=0, atol=0)
        torch.testing.assert_close(bias_r, bias.chunk(tp, 0)[rank], rtol=0, atol=0)
        torch.testing.assert_close(y_r, y if gather_output else y.chunk(tp, -1)[rank])
        torch.testing.assert_close(x_grad_r, x_grad.chunk(tp, 0)[rank] if sequence_parallel else x_grad)
        torch.testing.assert_close(w_grad_r, w_grad.chunk(tp, 0)[rank])
        torch.testing.assert_close(b_grad_r, b_grad.chunk(tp, 0)[rank])


def run_column_variant(sequence_parallel, keep_gathered_input, hooked):
    """The column layer with ``keep_gathered_input`` and/or a local matmul (plain ``F.linear`` that records
    the shapes it is given): its result, the shapes the hook saw, and the collectives per operation."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    layer = ColumnParallelLinear(
        IN, OUT, group=dist.group.WORLD, sequence_parallel=sequence_parallel, keep_gathered_input=keep_gathered_input
    )
    seen = []
    if hooked:
        layer.set_local_matmul(lambda x: seen.append(tuple(x.shape)) or F.linear(x, layer.weight, layer.bias))
    x_full, c = data()
    x = (x_full.chunk(tp, 0)[rank] if sequence_parallel else x_full).clone().requires_grad_()
    initial = layer.weight.detach().clone(), layer.bias.detach().clone()
    with CommRecorder() as recorder:
        y = layer(x)
        (y * c.chunk(tp, -1)[rank]).sum().backward()
    calls = {op: int(totals["calls"]) for op, totals in recorder.by_op().items()}
    return (y.detach(), x.grad, layer.weight.grad, layer.bias.grad, *initial), seen, calls


@pytest.mark.parametrize(
    ("sequence_parallel", "keep_gathered_input", "hooked"),
    [(True, True, False), (True, False, True), (False, False, True), (True, True, True)],
    ids=str,
)
def test_column_parallel_options_equal_nn_linear(run_ranks, sequence_parallel, keep_gathered_input, hooked):
    """Keeping the gathered input saves the backward's all-gather; a local matmul runs on this rank's whole
    (gathered) input inside the layer's communication, which stays one gather forward and one
    reduce-scatter (SP) or all-reduce backward. Both give ``nn.Linear``'s outputs and gradients."""
    tp = 2
    y, x_grad, w_grad, b_grad, weight, _ = reference()
    for rank, (result, seen, calls) in enumerate(
        run_ranks(tp, run_column_variant, sequence_parallel, keep_gathered_input, hooked)
    ):
        y_r, x_grad_r, w_grad_r, b_grad_r, weight_r, _ = result
        torch.testing.assert_close(weight_r, weight.chunk(tp, 0)[rank], rtol=0, atol=0)
        torch.testing.assert_close(y_r, y.chunk(tp, -1)[rank])
        torch.testing.assert_close(x_grad_r, x_grad.chunk(tp, 0)[rank] if sequence_parallel else x_grad)
        torch.testing.assert_close(w_grad_r, w_grad.chunk(tp, 0)[rank])
        torch.testing.assert_close(b_grad_r, b_grad.chunk(tp, 0)[rank])
        assert seen == ([(SEQ, BATCH, IN)] if hooked else [])
        if not sequence_parallel:
            assert calls == {"all_reduce": 1}
        elif hooked or keep_gathered_input:
            assert calls == {"all_gather": 1, "reduce_scatter": 1}
        else:
            assert calls == {"all_gather": 2, "reduce_scatter": 1}


def run_row(sequence_parallel, input_is_parallel, reduce_sp_grads):
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    layer = RowParallelLinear(
        IN, OUT, group=dist.group.WORLD, input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel
    )
    x_full, c = data()
    x = (x_full.chunk(tp, -1)[rank] if input_is_parallel else x_full).clone().requires_grad_()
    initial = layer.weight.detach().clone(), layer.bias.detach().clone()
    y = layer(x)
    (y * (c.chunk(tp, 0)[rank] if sequence_parallel else c)).sum().backward()
    if reduce_sp_grads:
        allreduce_sequence_parallel_grads(layer, group=dist.group.WORLD)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, *initial


@pytest.mark.parametrize(
    ("sequence_parallel", "input_is_parallel"), [(False, True), (False, False), (True, True)], ids=str
)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_equals_nn_linear(run_ranks, tp, sequence_parallel, input_is_parallel):
    y, x_grad, w_grad, b_grad, weight, bias = reference()
    results = run_ranks(tp, run_row, sequence_parallel, input_is_parallel, True)
    for rank, (y_r, x_grad_r, w_grad_r, b_grad_r, weight_r, bias_r) in enumerate(results):
        torch.testing.assert_close(weight_r, weight.chunk(tp, 1)[rank], rtol=0, atol=0)
        torch.testing.assert_close(bias_r, bias, rtol=0, atol=0)
        torch.testing.assert_close(y_r, y.chunk(tp, 0)[rank] if sequence_parallel else y)
        torch.testing.assert_close(x_grad_r, x_grad.chunk(tp, -1)[rank] if input_is_parallel else x_grad)
        torch.testing.assert_close(w_grad_r, w_grad.chunk(tp, 1)[rank])
        torch.testing.assert_close(b_grad_r, b_grad)


def run_row_copies(sequence_parallel):
    """This rank's forward of a row layer under the profiler: the copies it makes, and whether ``x`` moved."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    layer = RowParallelLinear(IN, OUT, group=dist.group.WORLD, bias=False, sequence_parallel=sequence_parallel)
    x = data()[0].chunk(tp, -1)[rank].clone().requires_grad_()
    before = x.detach().clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(x)
    copies = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::clone", "aten::copy_")]
    return copies, torch.equal(x.detach(), before)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["all-reduce", "reduce-scatter"])
def test_row_parallel_reduces_its_partial_product_in_place(run_ranks, sequence_parallel):
    """No copy of the partial product before its reduction: the all-reduce runs in it, and on gloo the
    reduce-scatter too (one copy of this rank's piece out of it); the input is left as it was."""
    for copies, unchanged in run_ranks(2, run_row_copies, sequence_parallel):
        assert unchanged
        assert copies == ([[SEQ // 2, BATCH, OUT]] if sequence_parallel else [])


def run_row_hooked(sequence_parallel):
    """The row layer with a local matmul that records its input's shape; the bias stays outside it."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    layer = RowParallelLinear(IN, OUT, group=dist.group.WORLD, sequence_parallel=sequence_parallel)
    seen = []
    layer.set_local_matmul(lambda x: seen.append(tuple(x.shape)) or F.linear(x, layer.weight))
    x_full, c = data()
    x = x_full.chunk(tp, -1)[rank].clone().requires_grad_()
    y = layer(x)
    (y * (c.chunk(tp, 0)[rank] if sequence_parallel else c)).sum().backward()
    allreduce_sequence_parallel_grads(layer, group=dist.group.WORLD)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, seen, sorted(layer.state_dict())


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_row_parallel_with_a_local_matmul_equals_nn_linear(run_ranks, sequence_parallel):
    tp = 2
    y, x_grad, w_grad, b_grad = reference()[:4]
    for rank, (y_r, x_grad_r, w_grad_r, b_grad_r, seen, names) in enumerate(
        run_ranks(tp, run_row_hooked, sequence_parallel)
    ):
        torch.testing.assert_close(y_r, y.chunk(tp, 0)[rank] if sequence_parallel else y)
        torch.testing.assert_close(x_grad_r, x_grad.chunk(tp, -1)[rank])
        torch.testing.assert_close(w_grad_r, w_grad.chunk(tp, 1)[rank])
        torch.testing.assert_close(b_grad_r, b_grad)
        assert seen == [(SEQ, BATCH, IN // tp)] and names == ["bias", "weight"]


def module_as_local_matmul():
    """A module sharing the layer's weight (as an fp8 linear does) used as the local matmul."""
    layer = ColumnParallelLinear(IN, OUT, group=dist.group.WORLD)
    names = sorted(layer.state_dict())
    doubled = nn.Linear(IN, OUT)
    doubled.weight, doubled.bias = layer.weight, layer.bias
    layer.set_local_matmul(lambda x: 2 * doubled(x))
    x = data()[0]
    hooked = layer(x)
    layer.set_local_matmul(doubled)
    registered = sorted(layer.state_dict()), [n for n, _ in layer.named_modules()]
    layer.set_local_matmul(None)
    return names, registered, torch.equal(hooked, 2 * layer(x))


def test_a_local_matmul_runs_and_a_module_is_not_registered_as_a_submodule(run_ranks):
    names, (names_with_module, modules), doubled = run_ranks(1, module_as_local_matmul)[0]
    assert doubled
    assert names == names_with_module == ["bias", "weight"] and modules == [""]


def test_row_parallel_bias_gradient_under_sp_is_partial_until_reduced(run_ranks):
    """Under SP each rank's bias gradient covers its sequence shard only: the sum over ranks is the
    full gradient, which is why the bias is tagged and ``allreduce_sequence_parallel_grads`` exists."""
    b_grad = reference()[3]
    partial = [r[3] for r in run_ranks(2, run_row, True, True, False)]
    assert not torch.allclose(partial[0], b_grad)
    torch.testing.assert_close(partial[0] + partial[1], b_grad)


def seeded_and_given_weights():
    """A ``seed=`` layer at tp=N holds the slice of the same layer at tp=1; ``full_weight`` is sliced."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(tp)][rank]  # new_group is collective: every rank makes each
    full_col = ColumnParallelLinear(IN, OUT, group=alone, seed=99)
    full_row = RowParallelLinear(IN, OUT, group=alone, seed=99)
    col = ColumnParallelLinear(IN, OUT, group=dist.group.WORLD, seed=99)
    row = RowParallelLinear(IN, OUT, group=dist.group.WORLD, seed=99)
    given = ColumnParallelLinear(IN, OUT, group=dist.group.WORLD, full_weight=full_row.weight, full_bias=full_row.bias)
    return [
        torch.equal(col.weight, full_col.weight.chunk(tp, 0)[rank]),
        torch.equal(col.bias, full_col.bias.chunk(tp, 0)[rank]),
        torch.equal(row.weight, full_row.weight.chunk(tp, 1)[rank]),
        torch.equal(row.bias, full_row.bias),
        torch.equal(full_col.weight, full_row.weight),  # same seed, same draw
        torch.equal(given.weight, full_row.weight.chunk(tp, 0)[rank]),
        not torch.equal(ColumnParallelLinear(IN, OUT, group=alone, seed=98).weight, full_col.weight),
    ]


@pytest.mark.parametrize("tp", [2, 4])
def test_a_seeded_layer_holds_the_slices_of_the_tp1_layer(run_ranks, tp):
    for checks in run_ranks(tp, seeded_and_given_weights):
        assert all(checks), checks


def bad_layers():
    group = dist.group.WORLD
    return error_messages(
        [
            lambda: ColumnParallelLinear(IN, 6, group=group),
            lambda: RowParallelLinear(6, OUT, group=group),
            lambda: ColumnParallelLinear(IN, OUT, group=group, full_weight=torch.zeros(OUT, IN + 1)),
            lambda: RowParallelLinear(IN, OUT, group=group, full_bias=torch.zeros(OUT), bias=False),
            lambda: RowParallelLinear(IN, OUT, group=group, input_is_parallel=False, sequence_parallel=True),
        ],
        TensorParallelError,
    )


def test_impossible_layers_are_refused_with_the_reason(run_ranks):
    messages = run_ranks(4, bad_layers)[0]
    assert messages == [
        "ColumnParallelLinear: out_features=6 does not divide over tp=4 ranks",
        "RowParallelLinear: in_features=6 does not divide over tp=4 ranks",
        f"ColumnParallelLinear: full_weight has shape {(OUT, IN + 1)}, expected {(OUT, IN)}",
        "RowParallelLinear: full_bias given but bias=False",
        "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True",
    ]
