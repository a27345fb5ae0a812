"""The block kernels one by one: :class:`SDPAKernel` (PyTorch's fused ops) against :class:`MathKernel` and
against autograd through ``scaled_dot_product_attention``, in the way the ring calls them.

The ring's contract is that a kernel's backward, given the *final* (merged over all key blocks) ``out``
and ``lse`` of its query rows, returns exactly this block's share of the gradients. The tests split the
keys of one query block into a full block and a causal diagonal block (as ring step ``s < r`` and the
diagonal step see them), run each block's backward with the global ``out``/``lse``, and compare the sum
(dQ) and the pieces (dK, dV) with autograd on the whole.

Tolerances: fp32, ``torch.testing``'s float32 default (the same sums in another order). bf16: the fused
kernel keeps bf16 intermediates (its block output and the probabilities fed to its matmuls), each rounded
to within half a bf16 epsilon (2**-8) of the row's scale, so results may differ from the fp32-internal
math kernel by a few such roundings: rtol 1.6e-2 (two epsilons, torch's bf16 default) and atol two
epsilons of the tensor's largest value (values near zero carry the rounding of their larger terms).
"""

import pytest
import torch
import torch.nn.functional as F

from cp_ring import KERNEL_NAMES, ContextParallelError, MathKernel, SDPAKernel, make_kernel
from cp_ring.sdpa_kernel import cuda_op, efficient_backward, efficient_forward, flash_backward, flash_forward

BATCH, HEADS, SEQ, DIM = 2, 4, 24, 16
SCALE = DIM**-0.5
BF16_EPS = 2**-7


def inputs(kv_heads, dtype=torch.float32, device="cpu", seq=SEQ):
    """``q, k, v, dout``; ``q`` and ``dout`` non-contiguous (a permuted ``[s, b, h*d]`` projection, as in a
    model), ``k``, ``v`` contiguous."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(seq, BATCH, HEADS * DIM, generator=generator).view(seq, BATCH, HEADS, DIM).permute(1, 2, 0, 3)
    k, v = (torch.randn(BATCH, kv_heads, seq, DIM, generator=generator) for _ in range(2))
    dout = torch.randn(seq, BATCH, HEADS, DIM, generator=generator).permute(1, 2, 0, 3)
    return [t.to(dtype=dtype, device=device) for t in (q, k, v, dout)]


def close(name, got, expected, dtype):
    tolerance = {}
    if dtype == torch.bfloat16:
        tolerance = dict(rtol=2 * BF16_EPS, atol=2 * BF16_EPS * expected.abs().max().item())
    torch.testing.assert_close(got.float(), expected.float(), **tolerance, msg=lambda m: f"{name}: {m}")


def run_kernel(kernel, q, k, v, dout, causal):
    out, lse = kernel.forward(q, k, v, causal=causal, scale=SCALE)
    return (out, lse, *kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=SCALE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sdpa_kernel_equals_math_kernel(causal, kv_heads, dtype):
    q, k, v, dout = inputs(kv_heads, dtype)
    assert not q.is_contiguous()
    fused = run_kernel(SDPAKernel(), q, k, v, dout, causal)
    math = run_kernel(MathKernel(), q, k, v, dout, causal)
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), fused, math):
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        close(name, got, expected, dtype)


def test_lse_is_the_natural_log_sum_exp_of_the_scaled_scores():
    q, k, v, _ = inputs(HEADS)
    _, lse = SDPAKernel().forward(q, k, v, causal=False, scale=SCALE)
    torch.testing.assert_close(lse, torch.logsumexp(SCALE * q @ k.transpose(-1, -2), dim=-1))


def blockwise(kernel, q, k, v, dout):
    """The ring's view of the second half of the queries: keys ``[0, s/2)`` as a full block and keys
    ``[s/2, s)`` as the causal diagonal block. Forward: merge the two blocks by the log-sum-exp rule;
    backward: each block against the merged ``out``/``lse``. Returns out, dq, dk, dv (fp32)."""
    half = q.size(2) // 2
    q2, do2 = q[:, :, half:], dout[:, :, half:]
    blocks = [(slice(0, half), False), (slice(half, None), True)]
    results = [kernel.forward(q2, k[:, :, keys], v[:, :, keys], causal=causal, scale=SCALE) for keys, causal in blocks]
    lse = torch.logsumexp(torch.stack([lse for _, lse in results]), dim=0)
    out = sum(o * torch.exp(block_lse - lse).unsqueeze(-1) for o, block_lse in results)
    grads = [
        kernel.backward(do2, q2, k[:, :, keys], v[:, :, keys], out, lse, causal=c, scale=SCALE) for keys, c in blocks
    ]
    dq, dk, dv = zip(*grads)
    return out, sum(dq), torch.cat(dk, 2), torch.cat(dv, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kernel", [SDPAKernel(), MathKernel()], ids=["sdpa", "math"])
def test_block_backward_with_the_merged_out_and_lse_gives_the_blocks_gradients(kernel, kv_heads, dtype):
    q, k, v, dout = inputs(kv_heads, dtype)
    half = SEQ // 2
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    mask = torch.ones(SEQ - half, SEQ, dtype=torch.bool).tril_(half)  # query half+i sees keys 0..half+i
    expected = F.scaled_dot_product_attention(qf[:, :, half:], kf, vf, attn_mask=mask, enable_gqa=kv_heads != HEADS)
    expected.backward(dout[:, :, half:].float())
    got = blockwise(kernel, q, k, v, dout)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, (expected, qf.grad[:, :, half:], kf.grad, vf.grad)):
        close(name, g, e.detach(), dtype)


def test_make_kernel_by_name():
    cpu = torch.device("cpu")
    assert KERNEL_NAMES == ("auto", "sdpa", "math")
    assert isinstance(make_kernel("auto", cpu), SDPAKernel)
    assert isinstance(make_kernel("sdpa", cpu), SDPAKernel)
    assert isinstance(make_kernel("math", cpu), MathKernel)
    assert isinstance(make_kernel("auto", torch.device("meta")), MathKernel)
    with pytest.raises(ContextParallelError, match=r"kernel='flash': must be one of \('auto', 'sdpa', 'math'\)"):
        make_kernel("flash", cpu)
    with pytest.raises(ContextParallelError, match="no fused SDPA op for device meta"):
        make_kernel("sdpa", torch.device("meta"))


def test_cuda_op_choice_by_dtype_head_dim_and_capability():
    assert cuda_op(torch.bfloat16, 64, (9, 0)) == "flash"
    assert cuda_op(torch.float16, 256, (8, 0)) == "flash"
    assert cuda_op(torch.float32, 64, (9, 0)) == "efficient"
    assert cuda_op(torch.bfloat16, 512, (9, 0)) == "efficient"
    assert cuda_op(torch.float16, 64, (7, 5)) == "efficient"
    assert cuda_op(torch.bfloat16, 20, (9, 0)) == "math"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ops", [(flash_forward, flash_backward), (efficient_forward, efficient_backward)])
def test_cuda_op_calls_match_the_op_schemas(ops, dtype):
    """The CUDA calls, run on ``meta`` tensors (PyTorch's shape functions for the same ops): the argument
    lists fit the schemas, lse comes back ``[b, h, sq]`` for a length that is not a multiple of 32 (the
    efficient op pads it), and the backward accepts it and gives gradients of the inputs' shapes."""
    forward, backward = ops
    q, k, v, dout = inputs(HEADS, dtype, device="meta", seq=40)
    out, lse = forward(q, k, v, True, SCALE)
    assert out.shape == q.shape and lse.shape == (BATCH, HEADS, 40) and lse.dtype == torch.float32
    grads = backward(dout, q, k, v, out, lse, True, SCALE)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["efficient-fp32", "flash-bf16"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_sdpa_kernel_on_cuda_gives_the_blocks_gradients(kv_heads, dtype):
    """On a GPU: the CUDA ops, driven as the ring drives them, against autograd (fp32 on the same GPU)."""
    q, k, v, dout = inputs(kv_heads, dtype, device="cuda")
    half = SEQ // 2
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    mask = torch.ones(SEQ - half, SEQ, dtype=torch.bool, device="cuda").tril_(half)
    expected = F.scaled_dot_product_attention(qf[:, :, half:], kf, vf, attn_mask=mask, enable_gqa=kv_heads != HEADS)
    expected.backward(dout[:, :, half:].float())
    got = blockwise(SDPAKernel(), q, k, v, dout)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, (expected, qf.grad[:, :, half:], kf.grad, vf.grad)):
        close(name, g, e.detach(), dtype)
