"""A whole attention block (QKV and output projections as plain ``nn.Linear`` + CP attention) equals the
unsharded block, parameter gradients included once they are summed over the ranks that share the weights.

The weights are replicated on every CP rank, but each rank's gradient covers only its tokens: the sum over
the CP ranks (over ``dp_cp`` once data parallelism joins in) is the full gradient. Tolerance:
``torch.testing``'s float32 default, as in ``test_attention.py``.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pstate
from cp_ring import ring_attention, shard_sequence, ulysses_attention

SEQ, BATCH, HIDDEN, HEADS, KV_HEADS = 16, 2, 32, 4, 2
HEAD_DIM = HIDDEN // HEADS


class AttentionBlock(nn.Module):
    """Grouped-query self-attention on ``[seq, batch, hidden]``; ``attention(q, k, v)`` in the SDPA layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, attention):
        seq, batch = x.shape[:2]
        heads = self.qkv(x).view(seq, batch, HEADS + 2 * KV_HEADS, HEAD_DIM).permute(1, 2, 0, 3)
        q, k, v = heads.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        out = attention(q, k, v)  # [batch, heads, seq, head_dim]
        return self.proj(out.permute(2, 0, 1, 3).reshape(seq, batch, HIDDEN))


def data():
    generator = torch.Generator().manual_seed(9)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator), torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def reference():
    block = AttentionBlock()
    x, c = data()
    x.requires_grad_()
    y = block(x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    (y * c).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def run_block(method, cp_group, reduce_group, batch_slice):
    block = AttentionBlock()
    x, c = (shard_sequence(t[:, batch_slice], group=cp_group) for t in data())
    x.requires_grad_()
    attention = ring_attention if method == "ring" else ulysses_attention
    y = block(x, lambda q, k, v: attention(q, k, v, group=cp_group))
    (y * c).sum().backward()
    for p in block.parameters():  # replicated weights, per-rank token gradients: sum them
        dist.all_reduce(p.grad, group=pstate.as_group(reduce_group))
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def run_world(method):
    return run_block(method, dist.group.WORLD, dist.group.WORLD, slice(None))


def run_with_pstate(method):
    """cp=2 x dp=2 on 4 ranks: each DP replica takes one batch element, CP splits its sequence, and the
    gradients are summed over ``ps.dp_cp`` (an ``Axis``: the functions take it as their group too)."""
    with pstate.initialize(pstate.ParallelConfig(cp=2)) as ps:
        assert ps.dp.size == 2 and ps.dp_cp.size == 4
        result = run_block(method, ps.cp, ps.dp_cp, slice(ps.dp.rank, ps.dp.rank + 1))
        return ps.cp.rank, ps.dp.rank, result


def part(x, rank, cp=2):
    chunks = x.chunk(2 * cp, 0)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], 0)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_attention_block_at_cp2_equals_the_unsharded_block(run_ranks, method):
    y, x_grad, grads = reference()
    for rank, (y_r, x_grad_r, grads_r) in enumerate(run_ranks(2, run_world, method)):
        torch.testing.assert_close(y_r, part(y, rank))
        torch.testing.assert_close(x_grad_r, part(x_grad, rank))
        for name, grad in grads.items():
            torch.testing.assert_close(grads_r[name], grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_attention_block_with_pstate_cp2_dp2_reduces_over_dp_cp(run_ranks, method):
    y, x_grad, grads = reference()
    for cp_rank, dp_rank, (y_r, x_grad_r, grads_r) in run_ranks(4, run_with_pstate, method):
        batch = slice(dp_rank, dp_rank + 1)
        torch.testing.assert_close(y_r, part(y[:, batch], cp_rank))
        torch.testing.assert_close(x_grad_r, part(x_grad[:, batch], cp_rank))
        for name, grad in grads.items():
            torch.testing.assert_close(grads_r[name], grad, msg=lambda m, n=name: f"{n}: {m}")
