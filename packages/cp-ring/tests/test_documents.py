"""Packed documents: ``ring_attention`` and ``ulysses_attention`` with ``documents`` against per-document SDPA.

The reference attends each document of each sequence alone (plain causal SDPA on its slice), which is what
a document mask must reproduce; the CP runs see the whole packed sequence, each rank its zigzag part, and
must give every position the output and gradients of its document alone. The document boundaries are
chosen to fall inside zigzag chunks and across them, and so that at cp=4 some ring steps hold no key of a
query's document (the ring skips those blocks: counted below).

Tolerance: ``torch.testing``'s float32 default; the masked sums equal the per-document ones up to order.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cp_ring import MathKernel, document_mask, ring_attention, shard_sequence, ulysses_attention

SEQ, BATCH, HEADS, KV_HEADS, DIM = 32, 2, 4, 2, 8
LENGTHS = ([5, 11, 3, 13], [6, 10, 8, 8])  # documents of each sequence: at cp=4 some ring blocks share none


def documents() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in LENGTHS])


def data():
    g = torch.Generator().manual_seed(3)
    shapes = [(BATCH, HEADS, SEQ, DIM), (BATCH, KV_HEADS, SEQ, DIM), (BATCH, KV_HEADS, SEQ, DIM)]
    q, k, v = (torch.randn(s, generator=g) for s in shapes)
    return q, k, v, torch.randn(BATCH, HEADS, SEQ, DIM, generator=g)


def reference():
    """Each document attended alone: out, dq, dk, dv of the whole batch."""
    q, k, v, c = (t.requires_grad_() for t in data())
    outs = []
    for b, lengths in enumerate(LENGTHS):
        start, parts = 0, []
        for n in lengths:
            piece = slice(start, start + n)
            qs, ks, vs = (t[b : b + 1, :, piece] for t in (q, k, v))
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
            start += n
        outs.append(torch.cat(parts, 2))
    out = torch.cat(outs)
    (out * c.detach()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def run_cp(method):
    group = dist.group.WORLD
    q, k, v, c = data()
    local = [shard_sequence(t, group=group, dim=2).clone().requires_grad_() for t in (q, k, v)]
    docs = shard_sequence(documents(), group=group, dim=1)
    if method == "ulysses":
        out = ulysses_attention(*local, group=group, documents=docs)
    else:
        kernel = MathKernel() if method == "ring-math" else None
        out = ring_attention(*local, group=group, documents=docs, kernel=kernel)
    (out * shard_sequence(c, group=group, dim=2)).sum().backward()
    return [out.detach()] + [t.grad for t in local]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("method", ["ring", "ring-math", "ulysses"])
def test_document_masked_cp_attention_equals_each_document_alone(run_ranks, method, cp):
    if method == "ulysses" and KV_HEADS % cp:
        pytest.skip("Ulysses needs kv_heads divisible by cp")
    expected = reference()
    for rank, got in enumerate(run_ranks(cp, run_cp, method)):
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(
                g, shard_part(e, rank, cp), msg=lambda m, n=name, r=rank: f"{method} {n} rank {r}: {m}"
            )


class CountingKernel(MathKernel):
    """MathKernel that counts the blocks it computes in the forward."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


def run_count():
    group = dist.group.WORLD
    q, k, v, _ = data()
    local = [shard_sequence(t, group=group, dim=2) for t in (q, k, v)]
    kernel = CountingKernel()
    ring_attention(*local, group=group, documents=shard_sequence(documents(), group=group, dim=1), kernel=kernel)
    return kernel.calls


def test_ring_skips_blocks_in_which_no_query_shares_a_document_with_a_key(run_ranks):
    """Rank 3 holds positions 12-15 and 16-19 (documents 1-2 of both sequences); rank 0's first half, the
    part of its block rank 3 may see, is positions 0-3 (document 0 of both): that step is skipped."""
    calls = run_ranks(4, run_count)
    assert calls[3] == 3 and sum(calls) < 16


def shard_part(x, rank, cp):
    chunks = x.chunk(2 * cp, 2)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], 2)


def test_document_mask_is_causal_within_each_document():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_a_masked_block_that_sees_no_key_gives_zero_output_and_minus_infinity_lse():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, True, True]]])
    out, lse = MathKernel().forward(q, k, v, causal=False, scale=0.5, mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4)) and bool((lse[:, :, 1] == float("-inf")).all())
    expected = F.scaled_dot_product_attention(q[:, :, ::2], k, v, attn_mask=mask[:, None, ::2], scale=0.5)
    torch.testing.assert_close(out[:, :, ::2], expected)
