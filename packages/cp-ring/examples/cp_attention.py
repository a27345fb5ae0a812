"""A causal self-attention block under context parallelism, checked against the same block on one process.

    torchrun --nproc-per-node 2 packages/cp-ring/examples/cp_attention.py [--ulysses]
    torchrun --nproc-per-node 4 packages/cp-ring/examples/cp_attention.py --hierarchical

Each CP rank holds its zigzag part of the sequence; ring attention (or Ulysses with ``--ulysses``, or with
``--hierarchical`` an all-to-all inside pairs of ranks and a ring across them, at CP4) attends over the
whole sequence; the replicated weights' gradients are summed over ``ps.dp_cp``.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pstate
from cp_ring import hierarchical_attention, ring_attention, shard_sequence, ulysses_attention, unshard_sequence

SEQ, BATCH, HIDDEN, HEADS = 64, 2, 32, 4


def block(x, qkv, proj, attention):
    seq, batch = x.shape[:2]
    q, k, v = qkv(x).view(seq, batch, 3, HEADS, HIDDEN // HEADS).permute(2, 1, 3, 0, 4)  # SDPA layout
    out = attention(q, k, v).permute(2, 0, 1, 3).reshape(seq, batch, HIDDEN)
    return proj(out)


HIERARCHICAL = "--hierarchical" in sys.argv
CONFIG = pstate.ParallelConfig(cp=4, cp_a2a=2) if HIERARCHICAL else pstate.ParallelConfig(cp=2)  # dp=1


def cp_attention(q, k, v, ps):
    if HIERARCHICAL:  # all-to-all over heads in ps.cp_a2a (adjacent ranks), ring over ps.cp_ring
        return hierarchical_attention(q, k, v, a2a_group=ps.cp_a2a, ring_group=ps.cp_ring, causal=True)
    attention = ulysses_attention if "--ulysses" in sys.argv else ring_attention
    return attention(q, k, v, group=ps.cp, causal=True)


with pstate.initialize(CONFIG) as ps:
    torch.manual_seed(0)  # same weights and data on every rank
    qkv, proj = torch.nn.Linear(HIDDEN, 3 * HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
    x = torch.randn(SEQ, BATCH, HIDDEN)  # [seq, batch, hidden]

    x_local = shard_sequence(x, group=ps.cp)  # zigzag: chunks r and 2cp-1-r of 2cp
    y_local = block(x_local, qkv, proj, lambda q, k, v: cp_attention(q, k, v, ps))
    y_local.sum().backward()
    for p in (*qkv.parameters(), *proj.parameters()):  # replicated over CP: sum the token gradients
        dist.all_reduce(p.grad, group=ps.dp_cp.group)
    cp_grads = [p.grad.clone() for p in (*qkv.parameters(), *proj.parameters())]

    qkv.zero_grad(), proj.zero_grad()
    y = block(x, qkv, proj, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    y.sum().backward()
    torch.testing.assert_close(unshard_sequence(y_local.detach(), group=ps.cp), y.detach())
    for got, expected in zip(cp_grads, (p.grad for p in (*qkv.parameters(), *proj.parameters()))):
        torch.testing.assert_close(got, expected)
    if ps.rank == 0:
        print(f"cp={ps.cp.size}: outputs and gradients equal the unsharded block's")
