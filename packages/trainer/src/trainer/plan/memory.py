"""Memory per GPU of one layout, broken down, for the pipeline stage that holds the most.

Model states as this trainer keeps them (``dp_shard.bytes_per_param``): fp32 parameters that are also
the master weights, or under ``bf16``/``fp16`` with ZeRO 0/1/2 16-bit weights with fp32 masters; fp32
gradients, AdamW's two fp32 moments. Dense states shard over ``dp*cp`` (the ``dp_cp`` group), experts'
over ``edp``: ZeRO-1 the masters and moments (its reduced gradient shard lives in the full local
gradient buffer), ZeRO-2 also the gradients, ZeRO-3 everything (plus the gathered unit being
used, the prefetched next one and the unit's gradients). Every mode reduces the gradients once per
step, so over several micro-batches ZeRO-2 and ZeRO-3 hold the full local gradients until then.
Under ``bf16``/``fp16`` autocast each in-flight micro-batch keeps the 16-bit weight copies its matmuls
saved for backward.

Activations per layer and micro-batch follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), term by term, generalised to grouped-query attention,
SwiGLU, rotary, no dropout and fused attention (``flash``: no ``s x s`` scores kept, only a row-wise
log-sum-exp). With ``flash=False``, dropout, GELU, LayerNorm and 16-bit residuals, it is their formula:
``s*b*h*(34 + 5*a*s/h)``, ``/t`` with sequence parallelism (``10 + 24/t`` without), ``34/t`` with
selective recomputation, and the layer input alone (``2*s*b*h``) with full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dp_shard import bytes_per_param
from tp_layers import padded_vocab_size

from ..model import ModelConfig
from .layout import Layout, Workload
from .models import attention_params, expert_params, mlp_params, norm_params, shared_expert_params
from .pipeline import PipelineCost

GIB = 2**30


def layer_activations(
    m: ModelConfig,
    s: int,
    b: int,
    tp: int = 1,
    *,
    sp: bool = False,
    recompute: str | None = None,
    act_bytes: int = 2,
    residual_bytes: int = 4,
    flash: bool = True,
    moe: bool = False,
    fused_norm: bool = True,
) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch of ``b`` sequences of ``s``
    tokens (the CP-local length) on one TP rank."""
    h, a, B, R = m.hidden, m.heads, act_bytes, residual_bytes
    q, kv = m.heads * m.head_dim, m.num_kv_heads * m.head_dim
    shared = tp if sp else 1  # what sequence parallelism splits; the rest is split by the heads / FFN
    sbh = s * b * h
    if recompute == "full":
        return sbh * R / shared
    masks = 2 * sbh / shared if m.dropout > 0 else 0  # 1-byte dropout masks after attention and MLP
    total = 2 * sbh * R / shared + masks  # the two norms' inputs (the residual stream)
    if m.norm == "rmsnorm" and not fused_norm:  # the composite RMSNorm also keeps x / rms for the weight
        total += 2 * sbh * R / shared
    total += sbh * B / shared  # the QKV projection's input
    total += s * b * (q + 2 * kv) * B / tp  # Q, K, V
    if m.position == "rotary":
        total += s * b * (q + kv) * B / tp  # rotated Q and K
    if recompute != "selective":
        if flash:
            total += a * s * b * 4 / tp  # the fused kernel's log-sum-exp rows
        else:
            scores = a * s * s * b / tp
            total += scores * B + (scores * (1 + B) if m.dropout > 0 else 0)  # softmax, its mask and output
    total += s * b * q * B / tp  # the output projection's input
    if moe:
        rows = m.moe_topk * s * b / shared  # token copies this rank's experts see, balanced routing
        total += sbh * B / shared + s * b * m.num_experts * 4 / shared  # router input and probabilities
        total += rows * h * B + rows * m.moe_ffn * (4 if m.mlp == "swiglu" else 2) * B
        if m.moe_shared_ffn_hidden:  # the shared expert: its gathered input and activation, split over TP
            total += sbh * B / shared + s * b * m.moe_shared_ffn_hidden * (4 if m.mlp == "swiglu" else 2) * B / tp
    else:
        total += sbh * B / shared  # the first MLP projection's input
        total += s * b * m.ffn * (4 if m.mlp == "swiglu" else 2) * B / tp  # activation function in and out
    return total


def moe_layers(m: ModelConfig, layers: int) -> int:
    """The most mixture-of-experts layers (``ModelConfig.is_moe_layer``) that one stage of ``layers``
    consecutive layers holds (stages start at multiples of ``layers``; the first ones may be dense)."""
    if layers < 1:
        return 0
    stages = range(0, m.layers, layers)
    return max(sum(m.is_moe_layer(i) for i in range(s, min(s + layers, m.layers))) for s in stages)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU by part; ``total`` is their sum, ``usable`` what the hardware offers the model."""

    parts: dict[str, float]
    usable: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def stage_params(m: ModelConfig, L: Layout) -> tuple[float, float, float]:
    """``(dense, expert, per_layer)`` parameters one rank of the fullest stage holds."""
    layers = m.layers // L.pp
    vocab = padded_vocab_size(m.vocab_size or 0, L.tp, m.vocab_pad_multiple)
    per_layer = (attention_params(m) + (0 if m.num_experts else mlp_params(m))) / L.tp + 2 * norm_params(m)
    moe = moe_layers(m, layers)
    dense = layers * per_layer + moe * (m.hidden * m.num_experts + shared_expert_params(m) / L.tp)
    if m.num_experts:
        dense += (layers - moe) * mlp_params(m) / L.tp
    first = vocab * m.hidden / L.tp + (m.max_seq_len * m.hidden if m.position == "learned" else 0)
    last = norm_params(m) + (0 if m.tied_embeddings and L.pp == 1 else vocab * m.hidden / L.tp)
    dense += first + last if L.pp == 1 else max(first, last)
    expert = moe * m.num_experts * expert_params(m) / (L.ep * L.etp)
    return dense, expert, per_layer


def _dtypes(weight_bytes: int) -> dict[str, Any]:
    if weight_bytes == 2:
        return {"weight_dtype": torch.bfloat16, "master_dtype": torch.float32}
    return {"weight_dtype": torch.float32, "master_dtype": None}


def memory(work: Workload, L: Layout, pipe: PipelineCost, usable: float) -> Memory:
    """The memory breakdown of the fuller of the first stage (most micro-batches in flight) and the last
    (the logits)."""
    m = work.model
    dense, expert, per_layer = stage_params(m, L)
    d, e = L.dp * L.cp, L.edp
    params = dense + expert
    # dp_shard.bytes_per_param's table: ZeRO-1's reduced shard lives in its full local gradient buffer;
    # bf16/fp16 under zero 0/1/2 means 16-bit weights with fp32 masters (sharded like the moments)
    w = 2 if work.precision in ("bf16", "fp16") and L.zero < 3 else 4
    master = 4 if w == 2 else 0
    dense_b, expert_b = bytes_per_param(L.zero, d, **_dtypes(w)), bytes_per_param(L.zero, e, **_dtypes(w))
    masters = master / (d if L.zero else 1), master / (e if L.zero else 1)
    parts = {
        "parameters": dense * dense_b["params"] + expert * expert_b["params"],
        "gradients": dense * dense_b["grads"] + expert * expert_b["grads"],
        "optimizer": dense * (dense_b["optimizer"] - masters[0]) + expert * (expert_b["optimizer"] - masters[1]),
        "master weights": dense * masters[0] + expert * masters[1],
    }
    accumulating = L.microbatches(work.global_batch) > 1
    if L.zero == 3:  # the root (the head), the unit in use and the prefetched one, and a unit's gradients
        vocab_unit = padded_vocab_size(m.vocab_size or 0, L.tp, m.vocab_pad_multiple) * m.hidden / L.tp
        parts["gathered units"] = 4 * (vocab_unit + 2 * max(per_layer, vocab_unit) + per_layer)
    if L.zero in (2, 3):  # reduced once per step: over several micro-batches the full local gradients wait
        parts["gradient staging"] = 4 * (params if accumulating else per_layer)
    s, act = work.seq_len // L.cp, 4 if work.precision == "fp32" else 2
    layers_per_set = m.layers // (L.pp * L.vpp)
    moe = moe_layers(m, layers_per_set)
    per_set = sum(
        count
        * layer_activations(
            m,
            s,
            L.micro_batch,
            L.tp,
            sp=L.sequence_parallel,
            recompute=L.recompute,
            act_bytes=act,
            moe=is_moe,
            fused_norm=work.fused_norm,
        )
        for is_moe, count in ((False, layers_per_set - moe), (True, moe))
        if count
    )
    vocab = padded_vocab_size(m.vocab_size or 0, L.tp, m.vocab_pad_multiple)
    shared = L.tp if L.sequence_parallel else 1
    # the loss's moment: the head's output, its fp32 copy, the shifted logits and their exponentials
    logits = s * L.micro_batch * vocab / L.tp * (act + (4 if act != 4 else 0) + 8)
    norm_copies = 3 if m.norm == "rmsnorm" and not work.fused_norm else 2
    logits += s * L.micro_batch * m.hidden * (4 * norm_copies - 4 + act) / shared  # the final norm's tensors
    first = pipe.in_flight + 0.5 * pipe.pending_w
    last = pipe.in_flight_last + 0.5 * pipe.pending_w if L.pp > 1 else first
    sets = first if first * per_set >= last * per_set + logits else last
    parts["activations"] = per_set * sets
    parts["logits"] = logits if sets == last else 0.0
    if L.recompute == "full":  # in backward, the layer being recomputed holds its activations (logits gone)
        layer = layer_activations(
            m, s, L.micro_batch, L.tp, sp=L.sequence_parallel, act_bytes=act, fused_norm=work.fused_norm
        )
        parts["activations"] += max(0.0, layer - parts["logits"])
    if work.precision != "fp32" and L.recompute != "full":
        parts["16-bit weight copies"] = 2 * params / L.vpp * sets  # each set: its chunk's weights
    parts["communication buffers"] = 2 * s * L.micro_batch * m.hidden * act / shared * (2 if L.pp > 1 else 1)
    return Memory(parts, usable)
