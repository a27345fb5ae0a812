"""Hugging Face ``config.json`` to :class:`ModelConfig` and back, for the families we convert exactly.

Every key of a ``config.json`` is either read (it sets a field), checked (only values that do not change
the model's math are accepted: ``attention_dropout=0``, no real sliding window, ...) or known to have
no effect on the model (token ids, ``use_cache``, ``dtype``, ...). Anything else is refused by name, so
a key that changes the math is never dropped silently. Both ways of writing the rotary settings are
read: ``transformers`` 5's ``rope_parameters`` and the older top-level ``rope_theta`` / ``rope_scaling``.
"""

from __future__ import annotations

from typing import Any

from ..errors import TrainerError
from ..model import ModelConfig
from .deepseek import DEEPSEEK_MOE_KEYS, check_deepseek_moe, deepseek_moe_config, deepseek_moe_fields
from .mamba import mamba2_fields
from .reader import Reader, refuse

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "mamba2")
LLAMA_LIKE = FAMILIES[1:-1]
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")

"""Keys that do not change the model's function (``pretraining_tp`` only reorders a matmul's sums)."""

YARN_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
ROPE_KEYS = frozenset(
    {
        "rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings", "partial_rotary_factor", *YARN_KEYS,
    }
)  # fmt: skip


def model_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict), or an error naming the key
    we cannot honour."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise refuse("model_type", kind, f"only {list(FAMILIES)} convert")
    reader = Reader(config)
    read = {"gpt2": _gpt2, "mamba2": mamba2_fields, "deepseek_v3": _deepseek_v3}.get(kind)
    fields = read(reader) if read is not None else _llama_like(reader, kind)
    reader.check_all_read()
    try:
        return ModelConfig(**fields)
    except TrainerError as error:
        raise TrainerError(f"config.json: {error}") from None


def _gpt2(r: Reader) -> dict[str, Any]:
    for key in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"):
        r.get(key)  # dropout: training only, not part of the converted model
    for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "n_ctx"):
        r.get(key)  # the double-heads model's classifier, not used by the language model
    r.only("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "only the tanh GELU is supported")
    r.only("scale_attn_weights", (True,), "attention scores must be scaled by 1/sqrt(head_dim)")
    r.only("scale_attn_by_inverse_layer_idx", (False,), "per-layer score scaling is not supported")
    r.only("add_cross_attention", (False,), "cross-attention is not supported")
    r.only("reorder_and_upcast_attn", (False, True), "")
    r.only("tie_word_embeddings", (True,), "GPT-2's output layer is the embedding table")
    hidden = r.need("n_embd")
    return dict(
        hidden=hidden, layers=r.need("n_layer"), heads=r.need("n_head"), ffn_hidden=r.get("n_inner", 4 * hidden),
        vocab_size=r.need("vocab_size"), max_seq_len=r.need("n_positions"), norm_eps=r.get("layer_norm_epsilon", 1e-5),
        norm="layernorm", position="learned", mlp="gelu", bias=True, tied_embeddings=True,
    )  # fmt: skip


def _llama_like(r: Reader, kind: str) -> dict[str, Any]:
    hidden, heads = r.need("hidden_size"), r.need("num_attention_heads")
    r.only("hidden_act", ("silu",), "only SiLU (SwiGLU) MLPs are supported")
    r.only("attention_dropout", (0, 0.0), "attention dropout is not supported")
    max_len = r.need("max_position_embeddings")
    _no_sliding_window(r, kind, max_len)
    head_dim = r.get("head_dim")
    fields: dict[str, Any] = dict(
        hidden=hidden, layers=r.need("num_hidden_layers"), heads=heads, kv_heads=r.get("num_key_value_heads"),
        ffn_hidden=r.need("intermediate_size"), vocab_size=r.need("vocab_size"), max_seq_len=max_len,
        norm_eps=r.get("rms_norm_eps", 1e-6), tied_embeddings=bool(r.get("tie_word_embeddings", False)),
        kv_channels=None if head_dim in (None, hidden // heads) and hidden % heads == 0 else head_dim,
        norm="rmsnorm", position="rotary", mlp="swiglu", bias=False,
    )  # fmt: skip
    fields.update(_rope(r, max_len))
    if kind in ("llama", "qwen3", "qwen3_moe"):
        attention_bias = bool(r.get("attention_bias", False))
        fields.update(qkv_bias=attention_bias, proj_bias=attention_bias)
    if kind == "llama":
        fields["mlp_bias"] = bool(r.get("mlp_bias", False))
    if kind in ("qwen2", "qwen2_moe"):
        r.only("qkv_bias", (True,), "Qwen2's query/key/value projections always have biases")
        fields.update(qkv_bias=True, proj_bias=False)
    fields["qk_norm"] = kind in ("qwen3", "qwen3_moe")
    if kind in MOE:
        fields.update(_moe(r, kind))
    return fields


def _deepseek_v3(r: Reader) -> dict[str, Any]:
    """DeepSeek-V3 (and V2-style) multi-latent attention, dense SwiGLU layers then (from
    ``first_k_dense_replace``) sigmoid-routed MoE layers with a shared expert."""
    heads, layers = r.need("num_attention_heads"), r.need("num_hidden_layers")
    r.only("hidden_act", ("silu",), "only SiLU (SwiGLU) MLPs are supported")
    r.only("attention_dropout", (0, 0.0), "attention dropout is not supported")
    r.only("attention_bias", (False,), "MLA projections with biases are not supported")
    r.only("num_key_value_heads", (heads,), "MLA expands keys and values for every query head")
    for key in ("num_nextn_predict_layers", "num_mtp_layers", "aux_loss_alpha", "seq_aux", "ep_size"):
        r.get(key)  # multi-token prediction modules are not part of the causal LM; training-only settings
    dense = r.get("first_k_dense_replace", 0)
    moe = deepseek_moe_fields(r, dense) if dense < layers and r.get("n_routed_experts") else {}
    if not moe:
        for key in DEEPSEEK_MOE_KEYS:
            r.get(key)  # MoE settings of no layer
    nope, rope_dim = r.need("qk_nope_head_dim"), r.need("qk_rope_head_dim")
    r.only("head_dim", (rope_dim,), "DeepSeek-V3's head_dim is its qk_rope_head_dim")
    r.only("qk_head_dim", (nope + rope_dim,), "must be qk_nope_head_dim + qk_rope_head_dim")
    max_len = r.need("max_position_embeddings")
    fields: dict[str, Any] = dict(
        hidden=r.need("hidden_size"), layers=layers, heads=heads, ffn_hidden=r.need("intermediate_size"),
        vocab_size=r.need("vocab_size"), max_seq_len=max_len, norm_eps=r.get("rms_norm_eps", 1e-6),
        tied_embeddings=bool(r.get("tie_word_embeddings", False)), norm="rmsnorm", position="rotary",
        mlp="swiglu", bias=False, attention="mla", q_lora_rank=r.get("q_lora_rank"),
        kv_lora_rank=r.need("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=r.need("v_head_dim"), rope_interleave=bool(r.get("rope_interleave", True)),
    )  # fmt: skip
    fields.update(_rope(r, max_len))
    return fields | moe


def _no_sliding_window(r: Reader, kind: str, max_len: int) -> None:
    """A sliding window is refused unless it is switched off or no shorter than the longest sequence."""
    use = r.get("use_sliding_window", kind in ("mistral", "mixtral"))
    window = r.get("sliding_window")
    r.get("max_window_layers")  # only used with use_sliding_window
    if use and window is not None and 0 < window < max_len:
        raise refuse(
            "sliding_window", window, f"sliding-window attention (window < {max_len} positions) is not supported"
        )
    layer_types = r.get("layer_types")
    if layer_types is not None and (set(layer_types) - {"full_attention"}) and use:
        raise refuse("layer_types", layer_types, "only full attention layers are supported")


def _rope(r: Reader, max_len: int) -> dict[str, Any]:
    """Rotary settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(r.get("rope_scaling") or {})
    params.update(r.get("rope_parameters") or {})
    if r.get("rope_theta") is not None:
        params.setdefault("rope_theta", r.config["rope_theta"])
    unknown = sorted(set(params) - ROPE_KEYS)
    if unknown:
        raise refuse(f"rope_parameters.{unknown[0]}", params[unknown[0]], "not understood")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise refuse("rope_parameters.rope_type", kind, "only 'default', 'linear', 'llama3' and 'yarn' are supported")
    for key in YARN_KEYS:
        if kind != "yarn" and params.get(key) is not None:
            raise refuse(f"rope_parameters.{key}", params[key], f"only read with rope_type='yarn', not {kind!r}")
    if params.get("attention_factor") is not None:
        raise refuse("rope_parameters.attention_factor", params["attention_factor"], "set by mscale instead")
    if params.get("truncate", True) is not True:
        raise refuse("rope_parameters.truncate", params["truncate"], "only YaRN's rounded ramp ends are supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", params["partial_rotary_factor"], "only full rotary is supported")
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": kind}
    if kind != "default":
        out["rope_factor"] = float(params.get("factor", 1.0))
    original = int(params.get("original_max_position_embeddings") or max_len)
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            rope_original_max_len=original,
        )
    if kind == "yarn":  # as transformers: a missing factor is the context's growth, 0 betas their defaults
        out.update(
            rope_factor=float(params.get("factor") or max_len / original), rope_original_max_len=original,
            rope_beta_fast=float(params.get("beta_fast") or 32.0), rope_beta_slow=float(params.get("beta_slow") or 1.0),
            rope_mscale=float(params.get("mscale") or 0.0),
            rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        )  # fmt: skip
    return out


def _moe(r: Reader, kind: str) -> dict[str, Any]:
    experts = r.get("num_local_experts") or r.get("num_experts")
    if not experts:
        raise TrainerError("config.json: num_local_experts / num_experts is missing")
    r.only("router_jitter_noise", (0, 0.0), "router jitter is not supported")
    r.only("decoder_sparse_step", (1,), "only models whose every layer is a mixture of experts are supported")
    r.only("mlp_only_layers", ([],), "only models whose every layer is a mixture of experts are supported")
    out = dict(
        num_experts=experts, moe_topk=r.need("num_experts_per_tok"), moe_every=1,
        moe_aux_loss_coeff=float(r.get("router_aux_loss_coef", 0.0)),
        moe_norm_topk=True if kind == "mixtral" else bool(r.get("norm_topk_prob", False)),
    )  # fmt: skip
    if kind != "mixtral":
        out["moe_ffn_hidden"] = r.need("moe_intermediate_size")
    if kind == "qwen2_moe":
        out.update(moe_shared_ffn_hidden=r.need("shared_expert_intermediate_size"), moe_shared_gate=True)
    return out


def family(model: ModelConfig) -> str:
    """The Hugging Face ``model_type`` our model's choices match exactly, else an error naming the choice."""
    if model.layer_pattern is not None:
        if set(model.layer_pattern) != {"M"} or model.norm != "rmsnorm":
            rule = "only all-Mamba RMSNorm models convert (Mamba2ForCausalLM)"
            raise TrainerError(f"model.layer_pattern={model.layer_pattern!r}: {rule}")
        return "mamba2"
    if model.attention == "mla":
        return _deepseek_family(model)
    if model.rope_interleave:
        raise TrainerError("model.rope_interleave=True: converts only with attention='mla' (DeepSeek-V3)")
    if (model.norm, model.position, model.mlp) == ("layernorm", "learned", "gelu"):
        if not (model.bias and model.tied_embeddings and model.kv_channels is None and not model.qk_norm):
            raise TrainerError("model: a GPT-2-shaped model converts only with bias=True and tied_embeddings=True")
        if model.num_experts or model.kv_heads not in (None, model.heads):
            raise TrainerError("model: GPT-2 has neither experts nor grouped-query attention")
        return "gpt2"
    if (model.norm, model.position, model.mlp) != ("rmsnorm", "rotary", "swiglu"):
        raise TrainerError("model: only GPT-2-shaped and Llama-shaped (rmsnorm, rotary, swiglu) models convert")
    qkv, proj, mlp = model.has_bias("qkv"), model.has_bias("proj"), model.has_bias("mlp")
    if model.num_experts:
        if model.moe_every != 1:
            raise TrainerError(
                f"model.moe_every={model.moe_every}: Hugging Face MoE models convert with every layer MoE"
            )
        if mlp:
            raise TrainerError("model.mlp_bias: no Hugging Face MoE family has MLP biases")
        _softmax_router(model)
        if model.moe_shared_ffn_hidden is not None:
            if not (model.moe_shared_gate and qkv and not proj and not model.qk_norm):
                raise TrainerError("model: a shared expert converts only as Qwen2-MoE (gated, QKV bias, no QK-norm)")
            return "qwen2_moe"
        if model.qk_norm:
            return "qwen3_moe" if qkv == proj else _mismatch("qwen3_moe")
        if qkv or proj or not model.moe_norm_topk:
            raise TrainerError("model: an MoE model without QK-norm converts as Mixtral (no biases, moe_norm_topk)")
        return "mixtral"
    if model.qk_norm:
        return "qwen3" if qkv == proj and not mlp else _mismatch("qwen3")
    if qkv and not proj and not mlp:
        return "qwen2"
    if qkv == proj:
        return "llama"
    return _mismatch("llama")


def _softmax_router(model: ModelConfig) -> None:
    """Mixtral and Qwen-MoE route by softmax over every expert, with no groups, bias or scaling."""
    routing = {"moe_score": "softmax", "moe_num_groups": 1, "moe_topk_groups": None, "moe_expert_bias": False,
               "moe_routed_scaling": 1.0}  # fmt: skip
    for name, plain in routing.items():
        if getattr(model, name) != plain:
            raise TrainerError(
                f"model.{name}={getattr(model, name)!r}: Mixtral and Qwen-MoE route without it (plain: {plain!r})"
            )


def _deepseek_family(model: ModelConfig) -> str:
    if (model.norm, model.position, model.mlp) != ("rmsnorm", "rotary", "swiglu") or model.has_bias("mlp"):
        raise TrainerError("model: an MLA model converts as DeepSeek-V3 only with rmsnorm, swiglu and no biases")
    if model.num_experts:
        check_deepseek_moe(model)
    return "deepseek_v3"


def _mismatch(kind: str) -> str:
    raise TrainerError(f"model: its biases (qkv_bias, proj_bias, mlp_bias) have no {kind} equivalent")


def hf_config(model: ModelConfig) -> dict[str, Any]:
    """``config.json`` for our model, in the family :func:`family` names."""
    kind = family(model)
    architecture = {
        "gpt2": "GPT2LMHeadModel", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM",
    }  # fmt: skip
    name = architecture.get(kind, kind.capitalize() + "ForCausalLM")
    common = {"architectures": [name], "model_type": kind, "vocab_size": model.vocab_size}
    if kind == "mamba2":
        return {
            **common, "architectures": ["Mamba2ForCausalLM"], "hidden_size": model.hidden,
            "num_hidden_layers": model.layers, "num_heads": model.mamba_heads, "head_dim": model.mamba_head_dim,
            "expand": model.mamba_expand, "n_groups": model.mamba_groups, "state_size": model.mamba_state,
            "conv_kernel": model.mamba_conv, "chunk_size": model.mamba_chunk, "use_bias": False,
            "use_conv_bias": True, "hidden_act": "silu", "layer_norm_epsilon": model.norm_eps,
            "tie_word_embeddings": model.tied_embeddings, "residual_in_fp32": True,
        }  # fmt: skip
    if kind == "gpt2":
        return {
            **common, "n_embd": model.hidden, "n_layer": model.layers, "n_head": model.heads,
            "n_positions": model.max_seq_len, "n_inner": model.ffn, "layer_norm_epsilon": model.norm_eps,
            "activation_function": "gelu_new", "tie_word_embeddings": True,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        }  # fmt: skip
    rope: dict[str, Any] = {"rope_type": model.rope_type, "rope_theta": model.rope_theta}
    if model.rope_type != "default":
        rope["factor"] = model.rope_factor
    original = model.rope_original_max_len or model.max_seq_len
    if model.rope_type == "llama3":
        rope.update(
            low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
            original_max_position_embeddings=original,
        )  # fmt: skip
    if model.rope_type == "yarn":
        rope.update(
            original_max_position_embeddings=original, beta_fast=model.rope_beta_fast, beta_slow=model.rope_beta_slow,
            mscale=model.rope_mscale, mscale_all_dim=model.rope_mscale_all_dim,
        )  # fmt: skip
    out = {
        **common, "hidden_size": model.hidden, "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads, "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim, "intermediate_size": model.ffn, "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps, "hidden_act": "silu", "tie_word_embeddings": model.tied_embeddings,
        "rope_parameters": rope, "attention_dropout": 0.0,
    }  # fmt: skip
    if kind == "deepseek_v3":
        del out["head_dim"]
        out.update(
            q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank, qk_nope_head_dim=model.qk_nope_head_dim,
            qk_rope_head_dim=model.qk_rope_head_dim, v_head_dim=model.v_head_dim, rope_interleave=model.rope_interleave,
            first_k_dense_replace=model.layers, attention_bias=False,
        )  # fmt: skip
        if model.num_experts:
            out.update(deepseek_moe_config(model))
    if kind in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = model.has_bias("qkv")
    if kind == "llama":
        out["mlp_bias"] = model.has_bias("mlp")
    if kind in ("mistral", "mixtral"):
        out["sliding_window"] = None
    if kind in MOE:
        out.update(num_experts_per_tok=model.moe_topk, router_aux_loss_coef=model.moe_aux_loss_coeff)
        out["num_local_experts" if kind == "mixtral" else "num_experts"] = model.num_experts
        if kind == "mixtral":
            out["intermediate_size"] = model.moe_ffn
        else:
            out.update(moe_intermediate_size=model.moe_ffn, norm_topk_prob=model.moe_norm_topk, decoder_sparse_step=1)
    if kind == "qwen2_moe":
        out["shared_expert_intermediate_size"] = model.moe_shared_ffn_hidden
    return out
