"""Model shapes for the planner: a preset name or a Hugging Face ``config.json`` (read by
:func:`trainer.hf.model_from_hf`, which refuses what it cannot honour); exact parameter counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import TrainerError
from ..hf import model_from_hf as model_from_hf_config
from ..model import PRESETS, ModelConfig, preset
from ..model.mla import mla_matrices


def parameter_count(cfg: ModelConfig) -> tuple[int, int]:
    """``(dense, expert)`` parameter counts of the model (without vocabulary padding)."""
    h, v = cfg.hidden, cfg.vocab_size or 0
    dense = v * h * (1 if cfg.tied_embeddings else 2) + (cfg.max_seq_len * h if cfg.position == "learned" else 0)
    dense += norm_params(cfg)
    expert = 0
    for layer in range(cfg.layers):
        kind = cfg.layer_kind(layer)
        if kind is None:
            dense += attention_params(cfg) + 2 * norm_params(cfg)
        else:  # a hybrid layer: one norm and one block
            dense += norm_params(cfg) + {"mamba": mamba_params, "attention": attention_params}.get(kind, _none)(cfg)
            if kind in ("mamba", "attention"):
                continue
        if cfg.is_moe_layer(layer):
            dense += h * cfg.num_experts + shared_expert_params(cfg)
            expert += cfg.num_experts * expert_params(cfg)
        else:
            dense += mlp_params(cfg)
    return dense, expert


def _none(cfg: ModelConfig) -> int:
    return 0


def mamba_params(cfg: ModelConfig) -> int:
    """A Mamba-2 mixer: ``in_proj`` (z, x, B, C, dt), the convolution and its bias, ``A_log``, ``D``,
    ``dt_bias``, the gated norm and ``out_proj``."""
    inner, heads, bc = cfg.mamba_inner, cfg.mamba_heads, 2 * cfg.mamba_groups * cfg.mamba_state
    projections = cfg.hidden * (2 * inner + bc + heads) + inner * cfg.hidden
    return projections + (inner + bc) * (cfg.mamba_conv + 1) + 3 * heads + inner


def norm_params(cfg: ModelConfig) -> int:
    return cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def attention_params(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        return sum(i * o + norm for i, o, norm in mla_matrices(cfg))
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    biases = (q + 2 * kv if cfg.has_bias("qkv") else 0) + (h if cfg.has_bias("proj") else 0)
    return h * (q + 2 * kv) + q * h + biases + (2 * cfg.head_dim if cfg.qk_norm else 0)


def mlp_params(cfg: ModelConfig) -> int:
    matrices = 3 if cfg.mlp == "swiglu" else 2
    return matrices * cfg.hidden * cfg.ffn + ((matrices - 1) * cfg.ffn + cfg.hidden if cfg.has_bias("mlp") else 0)


def expert_params(cfg: ModelConfig) -> int:
    """One expert's parameters (experts have no biases)."""
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.hidden * cfg.moe_ffn


def shared_expert_params(cfg: ModelConfig) -> int:
    """A MoE layer's shared expert and its gate (dense: split over TP, not EP)."""
    if cfg.moe_shared_ffn_hidden is None:
        return 0
    gate = cfg.hidden if cfg.moe_shared_gate else 0
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.hidden * cfg.moe_shared_ffn_hidden + gate


def resolve_model(name_or_path: str, vocab_size: int | None = None) -> ModelConfig:
    """A preset by name, or the model a Hugging Face ``config.json`` describes (a file or its directory)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if name_or_path in PRESETS or not (path.suffix == ".json" or path.is_file()):
        model = preset(name_or_path)
    else:
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainerError(f"--model {name_or_path}: no such file") from None
        except json.JSONDecodeError as error:
            raise TrainerError(f"--model {name_or_path}: invalid JSON: {error}") from None
        model = model_from_hf_config(config)
    return model.with_overrides(vocab_size=vocab_size) if vocab_size else model


def model_flags(model: ModelConfig, name: str) -> list[str]:
    """``trainer train`` flags that build ``model``: ``--model NAME`` for a preset, else ``--set`` per field."""
    if name in PRESETS and PRESETS[name] == model:
        return [f"--model {name}"]
    if name in PRESETS:
        base, flags = PRESETS[name], [f"--model {name}"]
    else:
        base = ModelConfig(hidden=model.hidden, layers=model.layers, heads=model.heads)
        flags = [f"--set model.{f}={getattr(model, f)}" for f in ("hidden", "layers", "heads")]
    for f in dataclasses.fields(ModelConfig):
        value = getattr(model, f.name)
        if value != getattr(base, f.name) and value is not None:
            text = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
            flags.append(f"--set model.{f.name}={text}")
    return flags
