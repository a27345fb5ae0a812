"""Cross entropy from vocab-sharded logits, without gathering them.

With ``z`` the logits of one token over the vocabulary ``K = vocab_size`` (only the columns below
``vocab_size`` count: the padding columns never enter the loss), ``m = max z`` and
``Z = sum exp(z - m)``, the loss of target ``t`` with label smoothing ``e`` is

    loss = log Z - (1 - e) * (z_t - m) - e * mean(z - m)

which is ``F.cross_entropy``'s ``(1 - e) * nll + e * mean(-log p)``, written relative to the maximum so
that large logits do not cancel. Each rank computes its partial max, then its partial ``Z``, its
``z_t - m`` (zero unless it owns ``t``) and its partial ``sum(z - m)``; one max and one sum all-reduce
give the loss. The gradient is ``softmax(z) - (1 - e) * onehot(t) - e / K`` on each
rank's own columns.
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm
from .errors import TensorParallelError


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, label_smoothing, ignore_index):
        tp, rank = comm.size_of(group), comm.rank_in(group)
        columns = logits.size(-1)
        start = rank * columns
        valid_columns = max(0, min(columns, vocab_size - start))
        z = logits.float()
        if valid_columns < columns:
            z = z.clone()
            z[..., valid_columns:] = float("-inf")
        m = z.max(dim=-1).values
        if tp > 1:
            comm.all_reduce(m, group, op=torch.distributed.ReduceOp.MAX)
        shifted = z - m.unsqueeze(-1)  # every term below is relative to the max: no cancellation of large values
        exp = shifted.exp()
        ignored = target == ignore_index
        local_target = target - start
        owned = (local_target >= 0) & (local_target < valid_columns) & ~ignored
        index = local_target.masked_fill(~owned, 0).unsqueeze(-1)
        shifted_t = torch.gather(shifted, -1, index).squeeze(-1).masked_fill(~owned, 0.0)
        parts = [exp.sum(-1), shifted_t]
        if label_smoothing:  # only then: a -inf logit (a masked word) would make the sum -inf, and 0 * -inf nan
            parts.append(shifted[..., :valid_columns].sum(-1))
        sums = torch.stack(parts)
        if tp > 1:
            comm.all_reduce(sums, group)
        loss = sums[0].log() - (1.0 - label_smoothing) * sums[1]
        if label_smoothing:
            loss = loss - label_smoothing * sums[2] / vocab_size
        total_exp = sums[0]
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(total_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, owned, ignored)
        ctx.label_smoothing, ctx.vocab_size, ctx.valid_columns = label_smoothing, vocab_size, valid_columns
        ctx.input_dtype, ctx.used = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise TensorParallelError(
                "vocab_parallel_cross_entropy: a second backward through the same loss (retain_graph) is not "
                "supported: the saved softmax becomes the gradient in place"
            )
        ctx.used = True
        softmax, index, owned, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -(1.0 - ctx.label_smoothing) * owned.to(grad.dtype).unsqueeze(-1))
        if ctx.label_smoothing:
            grad[..., : ctx.valid_columns] -= ctx.label_smoothing / ctx.vocab_size
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return (grad * scale).to(ctx.input_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Group,
    vocab_size: int,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross entropy (shape of ``target``, float32) of logits split over ``group`` along the
    last dimension: rank ``r`` holds columns ``[r*n, (r+1)*n)`` of ``n = logits_shard.size(-1)``.

    ``vocab_size`` is the true vocabulary size; columns at or past it (the padding of a
    :class:`VocabParallelEmbedding` table) are left out of the softmax. It also guards against the
    classic silent bug of passing logits that were already gathered (the loss would be ``log(tp)`` too
    high): a shard of ``vocab_size`` columns or more at ``tp > 1`` raises. Tokens whose target equals
    ``ignore_index`` get loss 0 and no gradient. Computed in float32 whatever the logits' dtype.
    """
    tp = comm.size_of(group)
    columns = logits_shard.size(-1)
    if tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise TensorParallelError(
            f"vocab_parallel_cross_entropy: target has shape {tuple(target.shape)}, expected the logits' "
            f"leading dimensions {tuple(logits_shard.shape[:-1])}"
        )
    if tp > 1 and columns >= vocab_size:
        raise TensorParallelError(
            f"vocab_parallel_cross_entropy: logits_shard has {columns} columns for vocab_size={vocab_size} "
            f"at tp={tp}: these look like logits already gathered over the TP group (the loss would be "
            f"off by log({tp})); pass this rank's shard, e.g. ColumnParallelLinear(gather_output=False)"
        )
    if columns * tp < vocab_size:
        raise TensorParallelError(
            f"vocab_parallel_cross_entropy: {tp} shards of {columns} columns cover {columns * tp} of "
            f"vocab_size={vocab_size} logits"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise TensorParallelError(f"vocab_parallel_cross_entropy: label_smoothing={label_smoothing} is not in [0, 1]")
    return _VocabParallelCrossEntropy.apply(logits_shard, target, group, vocab_size, label_smoothing, ignore_index)
