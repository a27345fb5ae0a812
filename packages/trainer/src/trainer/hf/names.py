"""Our layout-free tensor names (``trainer.model.shards``) against each family's Hugging Face names.

The mapping is a ``ckpt.Adapter`` of invertible rules built from the model's choices (which biases,
QK-norm, experts, a shared expert, tied embeddings), so a tensor the model has and the rules do not
name is an error rather than a dropped weight. A family that stores some of our tensors fused (GPT-2's
transposed ``c_attn``, Mamba-2's ``in_proj`` and ``conv1d``) names the fused tensor, which the layers
declare beside their pieces (``Piece.fused``): :func:`fuse_parts` builds it on export, and streaming
import reads each part's rows of it.
"""

from __future__ import annotations

import re

import torch

from ckpt import Adapter, Rename, Stack, Transpose
from ckpt.convert import Template

from ..model import ModelConfig
from ..model.pieces import Piece
from .config import MOE, family

IGNORED_HF = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
"""Buffers some older files store beside the weights (causal masks, rotary frequencies): not weights."""


def adapter(model: ModelConfig) -> Adapter:
    """The name mapping of ``model``'s family (see :func:`trainer.hf.config.family`)."""
    kind = family(model)
    if kind == "mamba2":
        return _mamba2(model)
    return _gpt2() if kind == "gpt2" else _llama_like(model, kind)


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


def unsqueezed_dim(name: str, model: ModelConfig) -> int | None:
    """The dimension of size one that the family's file adds to our tensor ``name`` (Mamba-2 stores the
    convolution weight ``[channels, width]`` as ``conv1d.weight`` ``[channels, 1, width]``), else ``None``."""
    if model.layer_pattern is not None and re.fullmatch(r"layers\.\d+\.mamba\.conv\.weight", name):
        return 1
    return None


def mapped(rules: tuple, name: str) -> bool:
    """Whether one of the adapter's ``rules`` maps our tensor ``name``."""
    return any(Template(rule.ours).match(name) is not None for rule in rules)


def fuse_parts(state: dict[str, torch.Tensor], pieces: list[Piece], model: ModelConfig) -> None:
    """Our tensors that the pieces declare as rows of a fused tensor (:class:`~trainer.model.pieces.Fused`)
    into that tensor, where the family's names map the fused tensor and not the parts (GPT-2's ``c_attn``,
    Mamba-2's ``in_proj`` and ``conv1d``)."""
    rules = adapter(model).rules
    fused: dict[str, dict[int, str]] = {}
    for piece in pieces:
        if piece.fused is not None and piece.name in state:
            fused.setdefault(piece.fused.name, {})[piece.fused.first] = piece.name
    for name, parts in fused.items():
        if mapped(rules, name) and not any(mapped(rules, part) for part in parts.values()):
            tensor = torch.cat([state.pop(parts[first]) for first in sorted(parts)])
            dim = unsqueezed_dim(name, model)
            state[name] = tensor if dim is None else tensor.unsqueeze(dim)


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
