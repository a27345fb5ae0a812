"""Model FLOPs per token (with and without recomputation) and a measured matmul rate, for the MFU the loop
reports (:mod:`.peak` chooses the peak it divides by; the measured rate is its fallback on CPUs).

Counted: every matmul of the forward (2 FLOPs per multiply-add) with the real sequence length, grouped
query heads, the FFN size (SwiGLU: three matrices), the experts a token visits (``topk``), the shared
expert and the router, the output layer, and the multi-token prediction modules (projection, block,
head); the attention scores counted in full (``s x s``, Megatron's convention, although causal kernels skip
half). Training is three forwards' worth (forward, input and weight gradients); recomputation is not
counted, as in the usual definition of MFU. With ``recompute`` the count is what the hardware really does
(HFU): ``full`` repeats every layer's forward, ``selective`` the attention scores and their weighted sum.
"""

from __future__ import annotations

import time
from functools import cache
from typing import NamedTuple

import torch

from ..model import ModelConfig
from ..model.mla import mla_matrices


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str | None = None) -> float:
    """Training FLOPs per token of the whole model (forward and backward), plus the forward work that
    ``recompute`` (``None``, ``"full"`` or ``"selective"``) repeats in the backward."""
    h, d = cfg.hidden, cfg.head_dim
    q, kv = cfg.heads * d, cfg.num_kv_heads * d
    core = 2 * 2 * seq_len * q  # scores and their weighted sum
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + core
    if cfg.attention == "mla":  # scores over the query/key width, outputs over the value width
        core = 2 * seq_len * cfg.heads * (d + cfg.v_head_dim)
        attention = sum(2 * i * o for i, o, _ in mla_matrices(cfg)) + core
    per_matrix = 2 * h
    dense_mlp = per_matrix * cfg.ffn * (3 if cfg.mlp == "swiglu" else 2)
    moe_mlp = cfg.moe_topk * per_matrix * cfg.moe_ffn * (3 if cfg.mlp == "swiglu" else 2) + 2 * h * cfg.num_experts
    if cfg.moe_shared_ffn_hidden is not None:  # the shared expert every token goes through
        moe_mlp += per_matrix * cfg.moe_shared_ffn_hidden * (3 if cfg.mlp == "swiglu" else 2)
    blocks = range(cfg.layers + cfg.mtp_depth)  # the MTP modules' blocks are global layers layers, layers+1, ...
    layers = sum(attention + (moe_mlp if cfg.is_moe_layer(i) else dense_mlp) for i in blocks)
    attention_blocks = len(blocks)
    if cfg.layer_pattern is not None:
        kinds = {"attention": attention, "mamba": mamba_flops(cfg), "mlp": dense_mlp, "moe": moe_mlp}
        layers = sum(kinds[cfg.layer_kind(i)] for i in range(cfg.layers))
        attention_blocks = cfg.layer_pattern.count("*")
    head = 2 * h * (cfg.vocab_size or 0)
    mtp = cfg.mtp_depth * (2 * 2 * h * h + head)  # each MTP module's 2h -> h projection and its head
    repeated = {None: 0, "full": layers, "selective": core * attention_blocks}[recompute]
    return 3.0 * (layers + head + mtp) + repeated


def mamba_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of a Mamba-2 mixer: its projections and the SSD scan's matmuls (within a
    chunk: ``C B^T`` and its product with ``x``; per position: the chunk state in and out)."""
    h, inner, heads = cfg.hidden, cfg.mamba_inner, cfg.mamba_heads
    n, chunk, bc = cfg.mamba_state, cfg.mamba_chunk, 2 * cfg.mamba_groups * cfg.mamba_state
    projections = 2 * h * (2 * inner + bc + heads) + 2 * inner * h
    return projections + 2 * chunk * heads * n + 2 * chunk * inner + 2 * 2 * inner * n


class MatmulRate(NamedTuple):
    """A measured matmul rate: ``flops`` per second on square ``n x n`` operands."""

    flops: float
    n: int


#: the growing square sizes tried; growth stops once one multiply takes ``_ENOUGH_S``.
_SIZES = (128, 256, 512, 1024)
_ENOUGH_S = 0.02


@cache
def measured_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> MatmulRate:
    """FLOP/s of a square matmul on ``device`` (best of three): MFU's peak where no datasheet figure is
    known (CPUs, unknown GPUs). The size grows from 128 to at most 1024 until one multiply takes 20 ms, so
    a dtype without a fast kernel (fp16 on most CPUs: about 2 s per 1024^3 multiply) costs a fraction of a
    second, not seconds per process. Measured once per process and argument set: a property of the
    machine, not of the run (a warm test worker or a resumed loop does not pay for it again)."""
    cuda = torch.device(device).type == "cuda"

    def best_of(n: int, tries: int) -> float:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        best = float("inf")
        for _ in range(tries):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    for n in _SIZES:
        seconds = best_of(n, 3)
        if seconds >= _ENOUGH_S:
            break
    return MatmulRate(2 * n**3 / seconds, n)
