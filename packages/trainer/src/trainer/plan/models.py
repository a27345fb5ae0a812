"""Model shapes for the planner: a preset name or a Hugging Face ``config.json``; exact parameter counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import TrainerError
from ..model import PRESETS, ModelConfig, preset


def parameter_count(cfg: ModelConfig) -> tuple[int, int]:
    """``(dense, expert)`` parameter counts of the model (without vocabulary padding)."""
    h, v = cfg.hidden, cfg.vocab_size or 0
    dense = v * h * (1 if cfg.tied_embeddings else 2) + (cfg.max_seq_len * h if cfg.position == "learned" else 0)
    dense += norm_params(cfg)
    expert = 0
    for layer in range(cfg.layers):
        dense += attention_params(cfg) + 2 * norm_params(cfg)
        if cfg.is_moe_layer(layer):
            dense += h * cfg.num_experts
            expert += cfg.num_experts * expert_params(cfg)
        else:
            dense += mlp_params(cfg)
    return dense, expert


def norm_params(cfg: ModelConfig) -> int:
    return cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def attention_params(cfg: ModelConfig) -> int:
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return h * (q + 2 * kv) + q * h + ((q + 2 * kv) + h if cfg.bias else 0)


def mlp_params(cfg: ModelConfig) -> int:
    matrices = 3 if cfg.mlp == "swiglu" else 2
    return matrices * cfg.hidden * cfg.ffn + ((matrices - 1) * cfg.ffn + cfg.hidden if cfg.bias else 0)


def expert_params(cfg: ModelConfig) -> int:
    """One expert's parameters (experts have no biases)."""
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.hidden * cfg.moe_ffn


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
        model = model_from_hf_config(config, source=str(path))
    return model.with_overrides(vocab_size=vocab_size) if vocab_size else model


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


def model_from_hf_config(config: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """The shape of a GPT-2, Llama, Mistral, Qwen2/3 or Mixtral-style (MoE) ``config.json``.

    Planning needs the shape only: Qwen2's query/key/value biases (a few thousand parameters per layer)
    and sliding windows are left out; shared experts are refused."""
    kind = config.get("model_type")
    if kind == "gpt2":
        h = config["n_embd"]
        return ModelConfig(
            hidden=h, layers=config["n_layer"], heads=config["n_head"], ffn_hidden=config.get("n_inner") or 4 * h,
            vocab_size=config["vocab_size"], max_seq_len=config.get("n_positions", 1024), norm="layernorm",
            position="learned", mlp="gelu", bias=True, tied_embeddings=True,
        )  # fmt: skip
    if kind not in LLAMA_LIKE:
        raise TrainerError(f"{source}: model_type={kind!r} is not one of {('gpt2', *LLAMA_LIKE)}")
    h, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, h // heads):
        raise TrainerError(f"{source}: head_dim={config['head_dim']} differs from hidden/heads={h // heads}")
    if config.get("shared_expert_intermediate_size"):
        raise TrainerError(f"{source}: shared experts (shared_expert_intermediate_size) are not modelled")
    fields: dict[str, Any] = dict(
        hidden=h, layers=config["num_hidden_layers"], heads=heads, kv_heads=config.get("num_key_value_heads"),
        ffn_hidden=config.get("intermediate_size"), vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 4096), norm="rmsnorm", position="rotary", mlp="swiglu",
        bias=False, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=float(config.get("rope_theta", 10000.0)), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
    )  # fmt: skip
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        fields.update(
            num_experts=experts, moe_topk=config.get("num_experts_per_tok", 2),
            moe_ffn_hidden=config.get("moe_intermediate_size") or config.get("intermediate_size"),
            moe_every=config.get("decoder_sparse_step", 1) or 1,
        )  # fmt: skip
    return ModelConfig(**fields)


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
