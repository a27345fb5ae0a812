"""``ring_attention`` and ``ulysses_attention`` against ``scaled_dot_product_attention`` on the full sequence.

Every rank builds the same full ``q, k, v`` and loss weights ``C``, keeps its part of the sequence
(zigzag or contiguous), runs CP attention and backpropagates ``sum(out * C_local)``. The parts each rank
returns are compared with the matching parts of the reference output and gradients, cut out here by an
independent implementation of the placement rule.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5). The ring merges per-block softmax
results with the log-sum-exp rule and Ulysses runs the same SDPA on fewer heads: the same sums in a
different order, which moves only the last bits.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cp_ring import ContextParallelError, MathKernel, SDPAKernel, ring_attention, shard_sequence, ulysses_attention

SEQ, BATCH, HEADS, DIM = 32, 2, 8, 8


def data(kv_heads, dtype=torch.float32):
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator)
    k = torch.randn(BATCH, kv_heads, SEQ, DIM, generator=generator)
    v = torch.randn(BATCH, kv_heads, SEQ, DIM, generator=generator)
    c = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype), c.to(dtype)


def reference(causal, kv_heads, dtype=torch.float32):
    """Full-sequence SDPA in fp32 (inputs rounded to ``dtype`` first): out, dq, dk, dv."""
    q, k, v, c = (t.float().requires_grad_() for t in data(kv_heads, dtype))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != HEADS)
    (out * c.detach()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def part(x, rank, cp, zigzag):
    """The test's own placement rule: rank ``r`` holds chunk ``r`` (contiguous) or chunks ``r`` and
    ``2cp-1-r`` (zigzag) of the sequence dimension (2)."""
    if not zigzag:
        return x.chunk(cp, 2)[rank]
    chunks = x.chunk(2 * cp, 2)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], 2)


def run_cp(method, causal, zigzag, kv_heads, dtype=torch.float32):
    group = dist.group.WORLD
    q, k, v, c = data(kv_heads, dtype)
    local = [shard_sequence(t, group=group, dim=2, zigzag=zigzag).clone().requires_grad_() for t in (q, k, v)]
    if method == "ulysses":
        out = ulysses_attention(*local, group=group, causal=causal, zigzag=zigzag)
    else:
        kernel = {"ring": None, "ring-math": MathKernel(), "ring-sdpa": SDPAKernel()}[method]
        out = ring_attention(*local, group=group, causal=causal, zigzag=zigzag, kernel=kernel)
    (out * shard_sequence(c, group=group, dim=2, zigzag=zigzag)).sum().backward()
    return [out.detach()] + [t.grad for t in local]


@pytest.mark.parametrize("kv_heads", [HEADS, 4, 2], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("method", ["ring-math", "ring-sdpa", "ulysses"])
def test_cp_attention_equals_full_sdpa(run_ranks, method, cp, causal, zigzag, kv_heads):
    if method == "ulysses" and kv_heads % cp:
        pytest.skip("Ulysses needs kv_heads divisible by cp (tested to raise below)")
    expected = reference(causal, kv_heads)
    for rank, got in enumerate(run_ranks(cp, run_cp, method, causal, zigzag, kv_heads)):
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(g, part(e, rank, cp, zigzag), msg=lambda m, n=name, r=rank: f"{n} rank {r}: {m}")


def test_the_default_kernel_on_cpu_is_pytorchs_fused_sdpa():
    assert SDPAKernel.available(torch.device("cpu"))


def test_ring_attention_at_cp1_is_plain_attention(run_ranks):
    expected = reference(True, 4)
    got = run_ranks(1, run_cp, "ring", True, True, 4)[0]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("method", ["ring-math", "ring-sdpa", "ulysses"])
def test_bf16_inputs_are_close_to_the_fp32_reference(run_ranks, method):
    """bf16 in, bf16 out, fp32 inside: within bf16 rounding (8 bits of mantissa, rtol 1.6e-2) of fp32
    attention on the same (bf16-rounded) inputs; atol 2e-2 covers values near zero."""
    expected = reference(True, 4, torch.bfloat16)
    for rank, got in enumerate(run_ranks(2, run_cp, method, True, True, 4, torch.bfloat16)):
        for g, e in zip(got, expected):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), part(e, rank, 2, True), rtol=1.6e-2, atol=2e-2)


def raises(fn, *args, **kwargs):
    try:
        fn(*args, group=dist.group.WORLD, **kwargs)
    except ContextParallelError as error:
        return str(error)
    return None


def bad_inputs():
    t = torch.zeros
    return [
        raises(ulysses_attention, t(1, 8, 4, 8), t(1, 2, 4, 8), t(1, 2, 4, 8)),
        raises(ulysses_attention, t(1, 6, 4, 8), t(1, 6, 4, 8), t(1, 6, 4, 8)),
        raises(ring_attention, t(1, 8, 4, 8), t(1, 3, 4, 8), t(1, 3, 4, 8)),
        raises(ring_attention, t(1, 8, 3, 8), t(1, 8, 3, 8), t(1, 8, 3, 8)),
        raises(ring_attention, t(1, 8, 4, 8), t(1, 8, 6, 8), t(1, 8, 6, 8)),
        raises(ring_attention, t(8, 4, 8), t(8, 4, 8), t(8, 4, 8)),
    ]


def test_bad_inputs_raise_naming_the_problem(run_ranks):
    messages = run_ranks(4, bad_inputs)[0]
    expected = [
        "2 key/value heads do not divide evenly over cp=4",
        "6 query heads do not divide evenly over cp=4",
        "8 query heads are not a multiple of 3 key/value heads",
        "local sequence length 3 is odd",
        "match q in batch, local seq and head_dim",
        "must be [batch, heads, seq, head_dim]",
    ]
    for message, fragment in zip(messages, expected):
        assert message is not None and fragment in message, (message, fragment)
