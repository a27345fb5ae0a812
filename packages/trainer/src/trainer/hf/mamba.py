"""``Mamba2ForCausalLM``'s ``config.json`` to :class:`~trainer.model.ModelConfig` fields."""

from __future__ import annotations

from typing import Any

from .reader import Reader, refuse


def mamba2_fields(r: Reader) -> dict[str, Any]:
    """``Mamba2ForCausalLM``: every layer a Mamba-2 mixer (``layer_pattern`` of ``M``), RMSNorm, no positions."""
    hidden, heads, head_dim = r.need("hidden_size"), r.need("num_heads"), r.need("head_dim")
    expand = r.get("expand", 2)
    if heads * head_dim != expand * hidden:
        raise refuse("num_heads", heads, f"num_heads*head_dim={heads * head_dim} must be expand*hidden_size")
    r.only("use_bias", (False,), "projection biases are not supported")
    r.only("use_conv_bias", (True,), "the convolution must have a bias")
    r.only("hidden_act", ("silu",), "only SiLU is supported")
    limit = r.get("time_step_limit", (0.0, float("inf")))
    if tuple(_float(v) for v in limit) != (0.0, float("inf")):
        raise refuse("time_step_limit", limit, "clamping the step size is not supported")
    for key in ("time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual"):
        r.get(key)  # initialisation only
    r.only("residual_in_fp32", (True, False), "")  # the residual stream is fp32 under autocast anyway
    layers = r.need("num_hidden_layers")
    r.only("layer_types", (None, ["mamba"] * layers), "only Mamba layers are supported")
    attention_heads = heads if hidden % heads == 0 and hidden // heads % 2 == 0 else 1  # unused: no attention
    return dict(
        hidden=hidden, layers=layers, heads=attention_heads, vocab_size=r.need("vocab_size"),
        norm_eps=r.get("layer_norm_epsilon", 1e-5), tied_embeddings=bool(r.get("tie_word_embeddings", False)),
        norm="rmsnorm", bias=False, layer_pattern="M" * layers, mamba_state=r.get("state_size", 128),
        mamba_conv=r.get("conv_kernel", 4), mamba_expand=expand, mamba_head_dim=head_dim,
        mamba_groups=r.get("n_groups", 1), mamba_chunk=r.get("chunk_size", 256),
    )  # fmt: skip


def _float(value: Any) -> Any:
    """A number of a ``config.json``: ``transformers`` 5 writes infinity as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    return float(value) if isinstance(value, str | int | float) else value
