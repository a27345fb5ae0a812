"""``hierarchical_attention`` (all-to-all inside groups of ``a`` adjacent CP ranks, ring across them) against
``scaled_dot_product_attention`` on the full sequence, and against per-document attention for packed
documents.

Every rank builds the same full ``q, k, v`` and loss weights ``C``, keeps its part of the sequence over the
whole CP group (zigzag or contiguous, ``shard_sequence`` over the world), runs hierarchical attention over
the inner groups ``[0..a-1], [a..2a-1], ...`` and the outer rings ``[i, i+a, ...]`` that the test makes
itself, and backpropagates ``sum(out * C_local)``. Each rank's output and q/k/v gradients are compared with
the matching part of the reference, cut out by the test's own placement rule.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5), as for ring and Ulysses attention:
the all-to-alls and permutations move values exactly, and the ring's log-sum-exp merge only reorders sums.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pstate
from cp_ring import ContextParallelError, MathKernel, SDPAKernel, hierarchical_attention, shard_sequence

SEQ, BATCH, HEADS, DIM = 32, 2, 8, 8
LENGTHS = ([5, 11, 3, 13], [6, 10, 8, 8])  # packed documents: boundaries inside and across zigzag chunks


def data(kv_heads, dtype=torch.float32):
    generator = torch.Generator().manual_seed(17)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator)
    k = torch.randn(BATCH, kv_heads, SEQ, DIM, generator=generator)
    v = torch.randn(BATCH, kv_heads, SEQ, DIM, generator=generator)
    c = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator)
    return tuple(t.to(dtype) for t in (q, k, v, c))


def documents():
    return torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in LENGTHS])


def reference(causal, kv_heads, packed=False, dtype=torch.float32):
    """out, dq, dk, dv of full-sequence SDPA in fp32 (each document alone when ``packed``; inputs rounded to
    ``dtype`` first)."""
    q, k, v, c = (t.float().requires_grad_() for t in data(kv_heads, dtype))
    if packed:
        out = torch.cat([per_document(q, k, v, b, lengths) for b, lengths in enumerate(LENGTHS)])
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != HEADS)
    (out * c.detach()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def per_document(q, k, v, b, lengths):
    start, parts = 0, []
    for n in lengths:
        qs, ks, vs = (t[b : b + 1, :, start : start + n] for t in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        start += n
    return torch.cat(parts, 2)


def part(x, rank, cp, zigzag):
    """The test's own placement rule over the whole CP group, along dimension 2."""
    if not zigzag:
        return x.chunk(cp, 2)[rank]
    chunks = x.chunk(2 * cp, 2)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], 2)


def sub_groups(a):
    """This rank's inner group (``a`` adjacent ranks) and outer ring (ranks equal modulo ``a``); every rank
    creates every group, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    inner = [dist.new_group(list(range(j * a, (j + 1) * a))) for j in range(world // a)]
    outer = [dist.new_group(list(range(i, world, a))) for i in range(a)]
    return inner[rank // a], outer[rank % a]


def run_hierarchical(a, causal, zigzag, kv_heads, kernel, packed=False, dtype=torch.float32):
    a2a, ring = sub_groups(a)
    world = dist.group.WORLD
    q, k, v, c = data(kv_heads, dtype)
    local = [shard_sequence(t, group=world, dim=2, zigzag=zigzag).clone().requires_grad_() for t in (q, k, v)]
    docs = shard_sequence(documents(), group=world, dim=1, zigzag=zigzag) if packed else None
    kernel = {"math": MathKernel(), "sdpa": SDPAKernel()}[kernel]
    out = hierarchical_attention(
        *local, a2a_group=a2a, ring_group=ring, causal=causal, zigzag=zigzag, kernel=kernel, documents=docs
    )
    (out * shard_sequence(c, group=world, dim=2, zigzag=zigzag)).sum().backward()
    return [out.detach()] + [t.grad for t in local]


def check(results, expected, cp, zigzag, what):
    for rank, got in enumerate(results):
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(
                g, part(e, rank, cp, zigzag), msg=lambda m, n=name, r=rank: f"{what} {n} rank {r}: {m}"
            )


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads", [HEADS, 4, 2], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cp4_as_2x2_equals_full_sdpa(run_ranks, causal, zigzag, kv_heads, kernel):
    expected = reference(causal, kv_heads)
    check(run_ranks(4, run_hierarchical, 2, causal, zigzag, kv_heads, kernel), expected, 4, zigzag, "2x2")


@pytest.mark.parametrize(("world", "a"), [(4, 1), (4, 4), (8, 2)], ids=["1x4", "4x1", "2x4"])
def test_other_splits_equal_full_sdpa(run_ranks, world, a):
    """``a = 1`` is a plain ring, ``a = cp`` plain Ulysses; at CP8 both levels have more than two ranks."""
    check(run_ranks(world, run_hierarchical, a, True, True, 4, "sdpa"), reference(True, 4), world, True, f"a={a}")


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_packed_documents_at_2x2_equal_each_document_alone(run_ranks, kernel):
    expected = reference(True, 2, packed=True)
    check(run_ranks(4, run_hierarchical, 2, True, True, 2, kernel, True), expected, 4, True, "packed")


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_bf16_at_2x2_is_close_to_the_fp32_reference(run_ranks, kernel):
    """bf16 in and out, fp32 inside the ring: within bf16 rounding (rtol 1.6e-2, atol 2e-2, as for the ring
    and Ulysses) of fp32 attention on the same bf16-rounded inputs."""
    expected = reference(True, 4, dtype=torch.bfloat16)
    for rank, got in enumerate(run_ranks(4, run_hierarchical, 2, True, True, 4, kernel, False, torch.bfloat16)):
        for g, e in zip(got, expected):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), part(e, rank, 4, True), rtol=1.6e-2, atol=2e-2)


def run_with_pstate_groups():
    """CP4 as 2x2 over ``pstate``'s ``cp_a2a`` / ``cp_ring`` axes, under the communication recorder: the
    parts of the output and dQ, and the payload bytes sent per axis and operation."""
    from pstate.comm import CommRecorder

    with pstate.initialize(pstate.ParallelConfig(cp=4, cp_a2a=2)) as ps:
        q, k, v, c = data(4)
        local = [shard_sequence(t, group=ps.cp, dim=2).clone().requires_grad_() for t in (q, k, v)]
        with CommRecorder.for_state(ps) as recorder:
            out = hierarchical_attention(*local, a2a_group=ps.cp_a2a, ring_group=ps.cp_ring, kernel=MathKernel())
            (out * shard_sequence(c, group=ps.cp, dim=2)).sum().backward()
        sent = {(r.axis, r.op): 0 for r in recorder.records}
        for r in recorder.records:
            sent[r.axis, r.op] += r.bytes
        return out.detach(), local[0].grad, sent


def test_pstate_groups_keep_the_contract_and_bytes_follow_the_formula(run_ranks):
    """Payload per rank (fp32, ``Q`` = this rank's q bytes, ``K`` its k bytes, ``a = r = 2``): the all-to-alls
    move q, k, v and out forward and their gradients backward, ``2Q + 2K`` each way; the ring sends a
    ``[2, b, kv/a, a*s_local, d]`` block (``2K``) ``r-1`` times forward, ``r-1`` times backward, and the
    gradient accumulator of that size ``r`` times (the last hop takes it home): ``(3r-2) * 2K``."""
    expected = reference(True, 4)
    big_q, big_k = BATCH * HEADS * (SEQ // 4) * DIM * 4, BATCH * 4 * (SEQ // 4) * DIM * 4
    for rank, (out, dq, sent) in enumerate(run_ranks(4, run_with_pstate_groups)):
        torch.testing.assert_close(out, part(expected[0], rank, 4, True))
        torch.testing.assert_close(dq, part(expected[1], rank, 4, True))
        assert sent == {
            ("cp_a2a", "all_to_all"): 2 * (2 * big_q + 2 * big_k),
            ("cp_ring", "send"): (3 * 2 - 2) * 2 * big_k,
            ("cp_ring", "recv"): (3 * 2 - 2) * 2 * big_k,
        }


def bad_inputs():
    a2a, ring = sub_groups(2)
    t = torch.zeros

    def error(*shapes):
        try:
            hierarchical_attention(*(t(s) for s in shapes), a2a_group=a2a, ring_group=ring)
        except ContextParallelError as e:
            return str(e)
        return None

    return [
        error((1, 8, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)),
        error((1, 9, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)),
        error((1, 8, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)),
        error((1, 8, 3, 8), (1, 8, 3, 8), (1, 8, 3, 8)),
    ]


def test_bad_inputs_raise_naming_the_problem(run_ranks):
    messages = run_ranks(4, bad_inputs)[0]
    expected = [
        "8 query heads are not a multiple of 3 key/value heads",
        "9 query heads do not divide evenly over the all-to-all group's 2 ranks",
        "1 key/value heads do not divide evenly over the all-to-all group's 2 ranks",
        "local sequence length 3 is odd",
    ]
    for message, fragment in zip(messages, expected):
        assert message is not None and fragment in message, (message, fragment)
