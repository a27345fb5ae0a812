"""Our layout-free tensor names (``trainer.model.shards``) against each family's Hugging Face names.

The mapping is a ``ckpt.Adapter`` of invertible rules built from the model's choices (which biases,
QK-norm, experts, a shared expert, tied embeddings), so a tensor the model has and the rules do not
name is an error rather than a dropped weight. GPT-2's fused, transposed ``c_attn`` is handled by
:func:`fuse_qkv` / :func:`split_qkv` around its adapter, Mamba-2's fused ``in_proj`` and ``conv1d`` by
:func:`fuse_mamba` (export) and :func:`mamba_source` (streaming import).
"""

from __future__ import annotations

import re

import torch

from ckpt import Adapter, Rename, Stack, Transpose

from ..model import ModelConfig
from .config import MOE, family

IGNORED_HF = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
"""Buffers some older files store beside the weights (causal masks, rotary frequencies): not weights."""


def adapter(model: ModelConfig) -> Adapter:
    """The name mapping of ``model``'s family (see :func:`trainer.hf.config.family`)."""
    kind = family(model)
    if kind == "mamba2":
        return _mamba2(model)
    return _gpt2() if kind == "gpt2" else _llama_like(model, kind)


MAMBA_IN = ("z", "x", "B", "C", "dt")
"""The parts of Mamba-2's fused ``in_proj``, in its row order (the convolution's: ``x, B, C``)."""


def _mamba2(model: ModelConfig) -> Adapter:
    layer, mixer = "backbone.layers.{i}", "backbone.layers.{i}.mixer"
    own = ("A_log", "D", "dt_bias", "norm.weight", "out_proj.weight", "in_proj.weight", "conv.weight", "conv.bias")
    rules = [
        Rename("embedding.weight", "backbone.embeddings.weight"),
        Rename("final_norm.weight", "backbone.norm_f.weight"),
        Rename("layers.{i}.norm1.weight", f"{layer}.norm.weight"),
        *(Rename(f"layers.{{i}}.mamba.{n}", f"{mixer}.{n.replace('conv.', 'conv1d.')}") for n in own),
    ]
    if not model.tied_embeddings:
        rules.append(Rename("head.weight", "lm_head.weight"))
    return Adapter(tuple(rules))


def _mamba_rows(model: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """The first row of each part in the fused ``in_proj`` and ``conv1d``."""
    inner, bc = model.mamba_inner, model.mamba_groups * model.mamba_state
    inputs = dict(zip(MAMBA_IN, (0, inner, 2 * inner, 2 * inner + bc, 2 * inner + 2 * bc)))
    return inputs, {"x": 0, "B": inner, "C": inner + bc}


def mamba_source(name: str, model: ModelConfig) -> tuple[str, tuple[int, ...], int] | None:
    """For a part of a Mamba-2 fused tensor (``layers.3.mamba.x.weight``, ``layers.3.mamba.conv.B.bias``):
    the fused tensor's name, its full shape as stored (``conv1d.weight`` ``[channels, 1, width]``) and the
    part's first row in it; ``None`` for any other name."""
    if model.layer_pattern is None:
        return None
    inputs, conv = _mamba_rows(model)
    inner, bc, heads = model.mamba_inner, model.mamba_groups * model.mamba_state, model.mamba_heads
    if found := re.fullmatch(r"layers\.(\d+)\.mamba\.(z|x|B|C|dt)\.weight", name):
        fused = f"layers.{found[1]}.mamba.in_proj.weight"
        return fused, (2 * inner + 2 * bc + heads, model.hidden), inputs[found[2]]
    if found := re.fullmatch(r"layers\.(\d+)\.mamba\.conv\.(x|B|C)\.(weight|bias)", name):
        shape = (inner + 2 * bc, 1, model.mamba_conv) if found[3] == "weight" else (inner + 2 * bc,)
        return f"layers.{found[1]}.mamba.conv.{found[3]}", shape, conv[found[2]]
    return None


def fuse_mamba(state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Mamba-2: our parts of ``in_proj`` and of the convolution into the fused tensors its adapter maps."""
    for i in range(model.layers):
        parts = [state.pop(f"layers.{i}.mamba.{p}.weight", None) for p in MAMBA_IN]
        if all(p is not None for p in parts):
            state[f"layers.{i}.mamba.in_proj.weight"] = torch.cat(parts)
        for w in ("weight", "bias"):
            parts = [state.pop(f"layers.{i}.mamba.conv.{p}.{w}", None) for p in "xBC"]
            if all(p is not None for p in parts):
                fused = torch.cat(parts)
                state[f"layers.{i}.mamba.conv.{w}"] = fused.unsqueeze(1) if w == "weight" else fused


def _gpt2() -> Adapter:
    return Adapter(
        (
            Rename("embedding.weight", "transformer.wte.weight"),
            Rename("position.weight", "transformer.wpe.weight"),
            *(
                Rename(f"layers.{{i}}.norm{n}.{w}", f"transformer.h.{{i}}.ln_{n}.{w}")
                for n in (1, 2)
                for w in ("weight", "bias")
            ),
            Transpose("layers.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight"),
            Rename("layers.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
            Transpose("layers.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight"),
            Rename("layers.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
            Transpose("layers.{i}.mlp.fc1.weight", "transformer.h.{i}.mlp.c_fc.weight"),
            Rename("layers.{i}.mlp.fc1.bias", "transformer.h.{i}.mlp.c_fc.bias"),
            Transpose("layers.{i}.mlp.fc2.weight", "transformer.h.{i}.mlp.c_proj.weight"),
            Rename("layers.{i}.mlp.fc2.bias", "transformer.h.{i}.mlp.c_proj.bias"),
            Rename("final_norm.weight", "transformer.ln_f.weight"),
            Rename("final_norm.bias", "transformer.ln_f.bias"),
        )
    )


def _llama_like(model: ModelConfig, kind: str) -> Adapter:
    layer = "model.layers.{i}"
    rules = [
        Rename("embedding.weight", "model.embed_tokens.weight"),
        Rename("final_norm.weight", "model.norm.weight"),
        Rename("layers.{i}.norm1.weight", f"{layer}.input_layernorm.weight"),
        Rename("layers.{i}.norm2.weight", f"{layer}.post_attention_layernorm.weight"),
        Rename("layers.{i}.attn.proj.weight", f"{layer}.self_attn.o_proj.weight"),
    ]
    if not model.tied_embeddings:
        rules.append(Rename("head.weight", "lm_head.weight"))
    if model.attention == "mla":
        rules += _mla(model, layer)
    else:
        suffixes = ("weight", "bias") if model.has_bias("qkv") else ("weight",)
        rules += [
            Rename(f"layers.{{i}}.attn.{p}.{w}", f"{layer}.self_attn.{p}_proj.{w}") for p in "qkv" for w in suffixes
        ]
    if model.has_bias("proj"):
        rules.append(Rename("layers.{i}.attn.proj.bias", f"{layer}.self_attn.o_proj.bias"))
    if model.qk_norm:
        rules += [Rename(f"layers.{{i}}.attn.{p}_norm.weight", f"{layer}.self_attn.{p}_norm.weight") for p in "qk"]
    if kind not in MOE:
        suffixes = ("weight", "bias") if model.has_bias("mlp") else ("weight",)
        pairs = (("gate", "gate_proj"), ("up", "up_proj"), ("fc2", "down_proj"))
        rules += [Rename(f"layers.{{i}}.mlp.{a}.{w}", f"{layer}.mlp.{b}.{w}") for a, b in pairs for w in suffixes]
        if model.num_experts:  # DeepSeek-V3: dense layers first, then MoE layers (the names tell them apart)
            rules += _deepseek_moe(layer)
        return Adapter(tuple(rules))
    if kind == "mixtral":
        moe, pairs = f"{layer}.block_sparse_moe", (("gate", "w1"), ("up", "w3"), ("fc2", "w2"))
    else:
        moe, pairs = f"{layer}.mlp", (("gate", "gate_proj"), ("up", "up_proj"), ("fc2", "down_proj"))
    rules.append(Rename("layers.{i}.mlp.router.weight", f"{moe}.gate.weight"))
    rules += [Stack(f"layers.{{i}}.mlp.experts.{a}", f"{moe}.experts.{{e}}.{b}.weight") for a, b in pairs]
    if model.moe_shared_ffn_hidden is not None:
        shared = (("gate", "gate_proj"), ("up", "up_proj"), ("fc2", "down_proj"))
        rules += [Rename(f"layers.{{i}}.mlp.shared.{a}.weight", f"{moe}.shared_expert.{b}.weight") for a, b in shared]
        rules.append(Rename("layers.{i}.mlp.shared.gate_weight", f"{moe}.shared_expert_gate.weight"))
    return Adapter(tuple(rules))


def _deepseek_moe(layer: str) -> list[Rename]:
    """DeepSeek-V3's router (its ``gate``, with the expert bias as ``e_score_correction_bias``), routed
    experts (one tensor per expert) and ungated shared expert."""
    pairs = (("gate", "gate_proj"), ("up", "up_proj"), ("fc2", "down_proj"))
    return [
        Rename("layers.{i}.mlp.router.weight", f"{layer}.mlp.gate.weight"),
        Rename("layers.{i}.mlp.router.expert_bias", f"{layer}.mlp.gate.e_score_correction_bias"),
        *(Stack(f"layers.{{i}}.mlp.experts.{a}", f"{layer}.mlp.experts.{{e}}.{b}.weight") for a, b in pairs),
        *(Rename(f"layers.{{i}}.mlp.shared.{a}.weight", f"{layer}.mlp.shared_experts.{b}.weight") for a, b in pairs),
    ]


def _mla(model: ModelConfig, layer: str) -> list[Rename]:
    """DeepSeek-V3's multi-latent attention projections and latent norms."""
    pairs = [("kv_down", "kv_a_proj_with_mqa"), ("kv_down_norm", "kv_a_layernorm"), ("kv_up", "kv_b_proj")]
    if model.q_lora_rank is None:
        pairs.append(("q", "q_proj"))
    else:
        pairs += [("q_down", "q_a_proj"), ("q_down_norm", "q_a_layernorm"), ("q_up", "q_b_proj")]
    return [Rename(f"layers.{{i}}.attn.{a}.weight", f"{layer}.self_attn.{b}.weight") for a, b in pairs]


def drop_ignored(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """``state`` (Hugging Face names) without stored buffers, and without ``lm_head.weight`` when the
    embeddings are tied (some files store the tied copy; the model uses the embedding table)."""
    out = {k: t for k, t in state.items() if not k.endswith(IGNORED_HF)}
    if model.tied_embeddings:
        out.pop("lm_head.weight", None)
    return out


def fuse_qkv(state: dict[str, torch.Tensor], layers: int) -> None:
    """GPT-2: our separate ``q``, ``k``, ``v`` into the fused ``qkv`` its adapter maps."""
    for i in range(layers):
        for w in ("weight", "bias"):
            parts = [state.pop(f"layers.{i}.attn.{p}.{w}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                state[f"layers.{i}.attn.qkv.{w}"] = torch.cat(parts)


def split_qkv(state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """GPT-2: the fused ``qkv`` back into our ``q``, ``k``, ``v``."""
    d = model.head_dim
    sizes = [model.heads * d, model.num_kv_heads * d, model.num_kv_heads * d]
    for i in range(model.layers):
        for w in ("weight", "bias"):
            fused = state.pop(f"layers.{i}.attn.qkv.{w}", None)
            if fused is not None:
                for p, piece in zip("qkv", fused.split(sizes)):
                    state[f"layers.{i}.attn.{p}.{w}"] = piece.contiguous()
