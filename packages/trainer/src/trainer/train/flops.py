"""Model FLOPs per token and the machine's measured matmul rate, for the MFU the loop reports.

Counted: every matmul of the forward (2 FLOPs per multiply-add) with the real sequence length, grouped
query heads, the FFN size (SwiGLU: three matrices), the experts a token visits (``topk``), the shared
expert and the router, and the output layer; the attention scores counted in full (``s x s``, Megatron's
convention, although causal kernels skip half). Training is three forwards' worth (forward, input and weight
gradients); recomputation is not counted, as in the usual definition of MFU.
"""

from __future__ import annotations

import time
from functools import cache

import torch

from ..model import ModelConfig
from ..model.mla import mla_matrices


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the whole model (forward and backward)."""
    h, d = cfg.hidden, cfg.head_dim
    q, kv = cfg.heads * d, cfg.num_kv_heads * d
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * seq_len * q
    if cfg.attention == "mla":  # scores over the query/key width, outputs over the value width
        attention = sum(2 * i * o for i, o, _ in mla_matrices(cfg)) + 2 * seq_len * cfg.heads * (d + cfg.v_head_dim)
    per_matrix = 2 * h
    dense_mlp = per_matrix * cfg.ffn * (3 if cfg.mlp == "swiglu" else 2)
    moe_mlp = cfg.moe_topk * per_matrix * cfg.moe_ffn * (3 if cfg.mlp == "swiglu" else 2) + 2 * h * cfg.num_experts
    if cfg.moe_shared_ffn_hidden is not None:  # the shared expert every token goes through
        moe_mlp += per_matrix * cfg.moe_shared_ffn_hidden * (3 if cfg.mlp == "swiglu" else 2)
    layers = sum(attention + (moe_mlp if cfg.is_moe_layer(i) else dense_mlp) for i in range(cfg.layers))
    head = 2 * h * (cfg.vocab_size or 0)
    return 3.0 * (layers + head)


@cache
def measured_matmul_flops(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int = 1024
) -> float:
    """FLOP/s of a square ``n x n`` matmul on ``device`` (best of a few): the stated peak for MFU. Measured
    once per process and argument set: a property of the machine, not of the run (a warm test worker or a
    resumed loop does not pay for it again)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
