"""The fused block kernel: PyTorch's own SDPA ops, called directly for the log-sum-exp they return.

``F.scaled_dot_product_attention`` returns only the output, but the ops behind it also return each query
row's log-sum-exp and have backward ops that take ``(out, lse)``, which is what a ring needs:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``), any float dtype;
- CUDA, fp16/bf16, head_dim <= 256, compute capability >= 8.0: ``aten._scaled_dot_product_flash_attention``
  (+ ``_backward``), FlashAttention-2;
- CUDA otherwise (fp32, older GPUs): ``aten._scaled_dot_product_efficient_attention`` (+ ``_backward``),
  the memory-efficient (cutlass) kernel.

The log-sum-exp convention: natural log, fp32, of the *scaled* scores, ``lse = log(sum_j exp(scale * q.k_j))``,
one value per query row, ``[b, h, sq]``. The flash ops give exactly that; the efficient op pads the row
dimension to a multiple of 32 (``[b, h, ceil(sq/32)*32]``), so its rows are cut to ``sq`` here and padded
back for its backward. Every backward op recomputes ``P = exp(scale * q k^T - lse)`` and
``D = rowsum(dO * out)`` from the ``out`` and ``lse`` it is given, so given the ring's *final* (merged)
``out`` and ``lse`` it returns this block's share of the gradients: ``dS = P * (dP - D)`` holds
block-wise with the global ``lse`` and ``out``.

Grouped-query attention: key/value heads are repeated to the query heads and their gradients summed back
(the CUDA efficient op has no GQA). On CUDA, non-contiguous inputs are copied, and head dims that are not
a multiple of 8 (which the CUDA ops do not take unpadded) go to :class:`MathKernel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ContextParallelError
from .kernel import MathKernel, repeat_kv, sum_groups

_LSE_ALIGN = 32  # the efficient op's log-sum-exp row padding


class SDPAKernel:
    """PyTorch's fused SDPA kernels (flash on CPU; flash or memory-efficient on CUDA, by dtype) as an
    :class:`~cp_ring.AttentionKernel`: no ``[sq, sk]`` score block is ever held, forward or backward. The ops
    take no mask: a masked block (packed documents) runs on :class:`MathKernel`."""

    @staticmethod
    def available(device: torch.device) -> bool:
        """Whether this PyTorch build has the fused ops for ``device`` (a CPU, or a CUDA device)."""
        ops = torch.ops.aten
        if device.type == "cpu":
            return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu")
        if device.type == "cuda":
            return torch.cuda.is_available() and hasattr(ops, "_scaled_dot_product_efficient_attention")
        return False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        op = _op_for(q)
        if op == "math" or mask is not None:
            return MathKernel().forward(q, k, v, causal=causal, scale=scale, mask=mask)
        k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
        out, lse = _ops(op)[0](q, k, v, causal, scale)
        return out.float(), lse.float()

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        op = _op_for(q)
        if op == "math" or mask is not None:
            return MathKernel().backward(dout, q, k, v, out, lse, causal=causal, scale=scale, mask=mask)
        hkv = k.size(1)
        k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        dq, dk, dv = _ops(op)[1](dout, q, k, v, out, lse.float(), causal, scale)
        return dq.float(), sum_groups(dk.float(), hkv), sum_groups(dv.float(), hkv)


def cuda_op(dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> str:
    """Which CUDA op runs a block: ``"flash"``, ``"efficient"`` or ``"math"`` (no unpadded fused op)."""
    if head_dim % 8:
        return "math"
    if dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and capability >= (8, 0):
        return "flash"
    return "efficient"


def _op_for(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        raise ContextParallelError(f"SDPAKernel: no fused SDPA op for device {q.device}; use MathKernel")
    return cuda_op(q.dtype, q.size(-1), torch.cuda.get_device_capability(q.device))


def _cpu_forward(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _dense(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous copies where needed: the CUDA ops want a unit last stride and aligned row strides, and
    a copy of one block's inputs costs little next to the attention over it."""
    return [t.contiguous() for t in tensors]


def flash_forward(q, k, v, causal, scale):
    """``aten._scaled_dot_product_flash_attention`` (dropout 0): ``(out, lse [b, h, sq])``."""
    q, k, v = _dense(q, k, v)
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return result[0], result[1]


def flash_backward(dout, q, k, v, out, lse, causal, scale):
    """Its backward. Dense (not variable-length) inputs: no cumulative lengths; the philox seed and offset
    are read only when dropout > 0, so empty tensors stand in for the forward's RNG state."""
    dout, q, k, v, out, lse = _dense(dout, q, k, v, out, lse)  # the ring passes row slices of lse
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, unused, unused, scale=scale
    )


def efficient_forward(q, k, v, causal, scale):
    """``aten._scaled_dot_product_efficient_attention`` (no bias, dropout 0): ``(out, lse [b, h, sq])``
    (its log-sum-exp rows padded to a multiple of 32 are cut back to ``sq``)."""
    q, k, v = _dense(q, k, v)
    result = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return result[0], result[1][..., : q.size(2)]


def efficient_backward(dout, q, k, v, out, lse, causal, scale):
    """Its backward, given ``lse`` padded back to the forward's shape; no bias gradient."""
    dout, q, k, v, out = _dense(dout, q, k, v, out)
    lse = F.pad(lse, (0, -q.size(2) % _LSE_ALIGN)).contiguous()
    unused = torch.empty(0, dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, unused, unused, 0.0, [True, True, True, False], causal, scale=scale
    )
    return grads[:3]


def _ops(op: str):
    """The ``(forward, backward)`` pair of ``op``."""
    if op == "cpu":
        return _cpu_forward, _cpu_backward
    return (flash_forward, flash_backward) if op == "flash" else (efficient_forward, efficient_backward)
