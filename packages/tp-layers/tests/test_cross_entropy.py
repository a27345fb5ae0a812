"""``vocab_parallel_cross_entropy`` against ``F.cross_entropy`` on the full logits, at TP = 1, 2 and 4.

The vocabulary is odd (13), so the sharded logits carry padding columns; they are filled with large
values, which would change the loss if they ever entered the softmax. Some targets are the ignore index.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pstate.testing import error_messages
from tp_layers import TensorParallelError, padded_vocab_size, vocab_parallel_cross_entropy

VOCAB, SEQ, BATCH, IGNORE = 13, 6, 4, -100


def data():
    generator = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(SEQ, BATCH, VOCAB, generator=generator)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    target[0, :2] = IGNORE
    target[1, 0], target[1, 1] = 0, VOCAB - 1
    return logits, target, torch.rand(SEQ, BATCH, generator=generator)


def reference(label_smoothing):
    logits, target, weight = data()
    logits.requires_grad_()
    loss = F.cross_entropy(
        logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view(SEQ, BATCH)
    (loss * weight).sum().backward()
    return loss.detach(), logits.grad


def run_loss(label_smoothing):
    rank, tp = dist.get_rank(), dist.get_world_size()
    logits, target, weight = data()
    padded = padded_vocab_size(VOCAB, tp)
    full = torch.cat([logits, torch.full((SEQ, BATCH, padded - VOCAB), 50.0)], dim=-1)
    shard = full.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(
        shard, target, group=dist.group.WORLD, vocab_size=VOCAB, label_smoothing=label_smoothing
    )
    (loss * weight).sum().backward()
    return loss.detach(), shard.grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loss_and_gradient_equal_torch_cross_entropy(run_ranks, tp, label_smoothing):
    loss, grad = reference(label_smoothing)
    results = run_ranks(tp, run_loss, label_smoothing)
    grads = torch.cat([g for _, g in results], dim=-1)
    for loss_r, _ in results:
        assert loss_r.dtype == torch.float32
        torch.testing.assert_close(loss_r, loss)
    torch.testing.assert_close(grads[..., :VOCAB], grad)
    assert not grads[..., VOCAB:].any()  # padding columns get no gradient
    assert not loss[0, :2].any() and not grads[0, :2].any()  # ignored tokens: no loss, no gradient


def run_stable():
    """Logits of 1e4 would overflow exp() without subtracting the maximum."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    logits = torch.tensor([[1e4, 1e4 - 1.0, 0.0, -1e4]])
    target = torch.tensor([1])
    return vocab_parallel_cross_entropy(logits.chunk(tp, -1)[rank], target, group=dist.group.WORLD, vocab_size=4)


def test_large_logits_stay_finite(run_ranks):
    want = F.cross_entropy(torch.tensor([[1e4, 1e4 - 1.0, 0.0, -1e4]]), torch.tensor([1]), reduction="none")
    for loss in run_ranks(2, run_stable):
        assert torch.isfinite(loss).all()
        torch.testing.assert_close(loss, want)


def run_gathered():
    """The classic mistake: every rank passes the full (gathered) logits."""
    logits, target, _ = data()
    try:
        vocab_parallel_cross_entropy(logits, target, group=dist.group.WORLD, vocab_size=VOCAB)
    except TensorParallelError as error:
        return str(error)
    return None


def test_already_gathered_logits_are_refused(run_ranks):
    for message in run_ranks(2, run_gathered):
        assert message is not None
        assert "13 columns for vocab_size=13 at tp=2" in message and "log(2)" in message


def test_the_guarded_mistake_really_is_off_by_log_tp(run_ranks):
    """What the guard prevents: with a vocab_size claiming the gathered width, the loss is exactly log(tp) high."""
    loss, _ = reference(0.0)
    results = run_ranks(2, run_gathered_unguarded)
    valid = loss != 0
    torch.testing.assert_close(results[0][valid], loss[valid] + math.log(2))


def run_gathered_unguarded():
    logits, target, _ = data()
    padded = torch.cat([logits, torch.zeros(SEQ, BATCH, 1)], dim=-1)  # 14 columns, so 2 x 14 >= 2 x 13
    padded[..., -1] = float("-inf")  # an extra column that contributes nothing
    return vocab_parallel_cross_entropy(padded, target, group=dist.group.WORLD, vocab_size=2 * VOCAB + 1)


def run_bad_shapes():
    group = dist.group.WORLD
    shard, target = torch.zeros(SEQ, BATCH, 4), torch.zeros(SEQ, BATCH, dtype=torch.long)
    return error_messages(
        [
            lambda: vocab_parallel_cross_entropy(shard, target[:, :2], group=group, vocab_size=7),
            lambda: vocab_parallel_cross_entropy(shard, target, group=group, vocab_size=9),
            lambda: vocab_parallel_cross_entropy(shard, target, group=group, vocab_size=7, label_smoothing=1.5),
        ],
        TensorParallelError,
    )


def test_mismatched_shapes_are_refused(run_ranks):
    messages = run_ranks(2, run_bad_shapes)[0]
    assert "target has shape (6, 2), expected the logits' leading dimensions (6, 4)" in messages[0]
    assert "2 shards of 4 columns cover 8 of vocab_size=9" in messages[1]
    assert "label_smoothing=1.5 is not in [0, 1]" in messages[2]


def run_bf16():
    rank, tp = dist.get_rank(), dist.get_world_size()
    logits, target, weight = data()
    full = torch.cat([logits, torch.zeros(SEQ, BATCH, padded_vocab_size(VOCAB, tp) - VOCAB)], -1).bfloat16()
    shard = full.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group=dist.group.WORLD, vocab_size=VOCAB)
    (loss * weight).sum().backward()
    return loss.detach(), shard.grad


def test_bf16_logits_are_computed_in_float32(run_ranks):
    """The loss of bf16 logits is float32 and equals the float32 loss of the same (rounded) logits; the
    gradient comes back in bf16, equal to the float32 gradient rounded (bf16 keeps 8 bits: rtol 2^-8)."""
    logits, target, weight = data()
    rounded = logits.bfloat16().float().requires_grad_()
    want = F.cross_entropy(rounded.reshape(-1, VOCAB), target.reshape(-1), reduction="none").view(SEQ, BATCH)
    (want * weight).sum().backward()
    results = run_ranks(2, run_bf16)
    grads = torch.cat([g for _, g in results], -1)
    assert grads.dtype == torch.bfloat16
    for loss, _ in results:
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grads[..., :VOCAB].float(), rounded.grad, rtol=2**-8, atol=1e-5)
