"""Transformer blocks built from the TP layers equal the unsharded blocks, at TP = 2 and 4, with and
without sequence parallelism: outputs, input gradients and every parameter gradient.

Both blocks are pre-norm residual blocks on ``[seq, batch, hidden]``. The MLP is column (``h -> 4h``),
GELU, row (``4h -> h``). Attention is a fused QKV column layer whose output features are laid out
``[heads, 3, head_dim]`` so that a contiguous column slice is whole heads, causal SDPA on this rank's
heads, and a row-parallel output projection. Parallel and reference blocks are built after the same
``torch.manual_seed`` and create their layers in the same order, so their weights agree by
construction (TP-invariant initialisation). Parameter gradients are put back together with the
``tensor_parallel_dim`` tag; the norms' (and, under SP, the row bias') gradients are completed by
``allreduce_sequence_parallel_grads`` after backward, or during it by
``reduce_sequence_parallel_grads_in_backward``. Tolerance: the float32 default of ``torch.testing``.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    allreduce_sequence_parallel_grads,
    mark_sequence_parallel,
    reduce_sequence_parallel_grads_in_backward,
    tensor_parallel_dim,
)

SEED, SEQ, BATCH, HIDDEN, HEADS = 21, 8, 2, 32, 4


class MLP(nn.Module):
    def __init__(self, group=None, sequence_parallel=False):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        if group is None:
            self.fc1, self.fc2 = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)
        else:
            sp = sequence_parallel
            self.fc1 = ColumnParallelLinear(HIDDEN, 4 * HIDDEN, group=group, sequence_parallel=sp)
            self.fc2 = RowParallelLinear(4 * HIDDEN, HIDDEN, group=group, sequence_parallel=sp)
            if sp:
                mark_sequence_parallel(self.norm)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Attention(nn.Module):
    def __init__(self, group=None, sequence_parallel=False):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        if group is None:
            self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        else:
            sp = sequence_parallel
            self.qkv = ColumnParallelLinear(HIDDEN, 3 * HIDDEN, group=group, sequence_parallel=sp)
            self.proj = RowParallelLinear(HIDDEN, HIDDEN, group=group, sequence_parallel=sp)
            if sp:
                mark_sequence_parallel(self.norm)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        seq, batch = qkv.shape[:2]
        q, k, v = qkv.view(seq, batch, -1, 3, HIDDEN // HEADS).permute(3, 1, 2, 0, 4)  # 3 x [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))


BLOCKS = {"mlp": MLP, "attention": Attention}


def data():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator), torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def reference(kind):
    torch.manual_seed(SEED)
    block = BLOCKS[kind]()
    x, c = data()
    x.requires_grad_()
    y = block(x)
    (y * c).sum().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in block.named_parameters()}


def run_block(kind, sequence_parallel, in_backward=False):
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.manual_seed(SEED)
    block = BLOCKS[kind](group, sequence_parallel)
    if in_backward:
        reduce_sequence_parallel_grads_in_backward(block, group=group)
    x_full, c_full = data()
    if sequence_parallel:
        x_full, c_full = x_full.chunk(tp, 0)[rank], c_full.chunk(tp, 0)[rank]
    x = x_full.clone().requires_grad_()
    y = block(x)
    (y * c_full).sum().backward()
    if not in_backward:
        allreduce_sequence_parallel_grads(block, group=group)
    grads = {name: (p.grad, tensor_parallel_dim(p)) for name, p in block.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize(
    "sequence_parallel, in_backward", [(False, False), (True, False), (True, True)], ids=["tp", "sp", "sp-hooks"]
)
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_parallel_block_equals_the_unsharded_block(run_ranks, kind, tp, sequence_parallel, in_backward):
    y, x_grad, grads = reference(kind)
    results = run_ranks(tp, run_block, kind, sequence_parallel, in_backward)
    split = 0 if sequence_parallel else None
    for rank, (y_r, x_grad_r, _) in enumerate(results):
        torch.testing.assert_close(y_r, y if split is None else y.chunk(tp, 0)[rank])
        torch.testing.assert_close(x_grad_r, x_grad if split is None else x_grad.chunk(tp, 0)[rank])
    for name, want in grads.items():
        dim = results[0][2][name][1]
        pieces = [r[2][name][0] for r in results]
        if dim is None:  # replicated: every rank holds the full gradient
            for rank, piece in enumerate(pieces):
                torch.testing.assert_close(piece, want, msg=lambda m, r=rank, n=name: f"{n} on rank {r}: {m}")
        else:
            torch.testing.assert_close(torch.cat(pieces, dim), want, msg=lambda m, n=name: f"{n}: {m}")
