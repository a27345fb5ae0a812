"""The column- and row-parallel matmuls, each with its collectives as one autograd function.

The row-parallel one (``x W^T`` summed over the group) reduces its own partial product in place and
gathers the output gradient once in backward (:func:`row_parallel_linear`). The column-parallel one
overlaps communication in backward:

Forward: ``y = x W^T + b`` on this rank's output rows; under sequence parallelism ``x`` is first
all-gathered along the sequence (dimension 0). Backward, in order:

1. under SP, start re-gathering the input (by default it is not kept gathered: that saves ``tp - 1``
   shards of activation memory per layer for one all-gather per backward; ``keep_gathered_input``
   keeps the gathered input instead, as DTensor's tensor parallel does);
2. compute the input gradient ``dy W``;
3. start its all-reduce (or, under SP, its reduce-scatter back to the sequence shard);
4. compute the weight and bias gradients while that collective runs;
5. wait, and return.

The collectives are asynchronous on every backend, so the overlap happens on GPUs (NCCL streams) and
the order is exercised on CPU (gloo) by the same code.
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in the autocast dtype when autocast is on for their device (as ``F.linear`` would
    cast them), so that the backward, which runs outside autocast, sees the same dtypes."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class _ColumnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel, keep_gathered):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.regather = sequence_parallel and not keep_gathered
        ctx.sequence_parallel = sequence_parallel
        x, weight, bias = _autocast(x, weight, bias)
        total = comm.all_gather(x, 0, group) if sequence_parallel else x
        ctx.save_for_backward(x if ctx.regather else total, weight)
        return torch.nn.functional.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors  # x: the input shard, or the gathered input when kept
        group, sp = ctx.group, ctx.sequence_parallel
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        gather = comm.all_gather_async(x, group) if ctx.regather and need_weight else None
        grad_input, reduce_work = None, None
        if need_input:
            grad_total = grad_out.matmul(weight)
            if sp:
                grad_input, reduce_work = comm.reduce_scatter_async(
                    grad_total, group, "ColumnParallelLinear", scratch=True
                )
            else:
                grad_input = grad_total
                reduce_work = comm.all_reduce(grad_input, group, async_op=True)
        grad_weight = grad_bias = None
        flat_grad = grad_out.reshape(-1, grad_out.size(-1))
        if need_weight:
            if gather is not None:
                total, work = gather
                work.wait()
            else:
                total = x
            grad_weight = flat_grad.t().matmul(total.reshape(-1, total.size(-1)))
        if need_bias and ctx.has_bias:
            grad_bias = flat_grad.sum(0)
        if reduce_work is not None:
            reduce_work.wait()
        return grad_input, grad_weight, grad_bias, None, None, None


class _RowLinear(torch.autograd.Function):
    """``x W^T`` summed over the group (all-reduce, or reduce-scatter along dimension 0 under sequence
    parallelism) in one node: the partial product is this function's own temporary, reduced in place
    (no defensive copy), and backward gathers the output gradient once for both of its matmuls."""

    @staticmethod
    def forward(ctx, x, weight, group, sequence_parallel):
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        x, weight = _autocast(x, weight)
        ctx.save_for_backward(x, weight)
        partial = torch.nn.functional.linear(x, weight)
        if sequence_parallel:
            return comm.reduce_scatter(partial, 0, group, "RowParallelLinear", scratch=True)
        comm.all_reduce(partial, group)
        return partial

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_input, need_weight = ctx.needs_input_grad[:2]
        grad = comm.all_gather(grad_out, 0, ctx.group) if ctx.sequence_parallel else grad_out
        grad_input = grad.matmul(weight) if need_input else None
        grad_weight = None
        if need_weight:
            flat = grad.reshape(-1, grad.size(-1))
            grad_weight = flat.t().matmul(x.reshape(-1, x.size(-1)))
        return grad_input, grad_weight, None, None


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, *, group: Group, sequence_parallel: bool = False
) -> torch.Tensor:
    """``x W^T`` for a weight split by input columns over ``group``, ``x`` split along its last dimension:
    the partial products are summed over the group (all-reduce; with ``sequence_parallel`` a
    reduce-scatter along dimension 0, whose gradient is all-gathered back). No bias: a row-parallel
    layer adds its full bias once, after the sum. :class:`RowParallelLinear`'s computation."""
    if comm.size_of(group) == 1:
        return torch.nn.functional.linear(x, weight)
    return _RowLinear.apply(x, weight, group, sequence_parallel)


def column_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group: Group,
    sequence_parallel: bool = False,
    keep_gathered_input: bool = False,
) -> torch.Tensor:
    """``x W^T + b`` for a weight split by output rows over ``group``; the input is replicated over the
    group (its gradient is all-reduced) or, with ``sequence_parallel``, split along dimension 0 (it is
    all-gathered, and its gradient reduce-scattered). The output is split along the last dimension.
    Under sequence parallelism backward gathers the input again, unless ``keep_gathered_input`` keeps
    the forward's gathered copy (``tp`` times the shard's memory, one all-gather fewer per backward).

    This is :class:`ColumnParallelLinear`'s computation, exposed for weights that live elsewhere, such
    as an output layer tied to a :class:`VocabParallelEmbedding`.
    """
    if comm.size_of(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    return _ColumnLinear.apply(x, weight, bias, group, sequence_parallel, keep_gathered_input)
