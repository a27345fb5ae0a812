"""Named model shapes: CPU-sized ones that train in seconds (``tiny``, ``tiny-gpt2``, ``tiny-moe``,
``tiny-mla``, ``tiny-hybrid``) and the real shapes of well-known models."""

from __future__ import annotations

from ..errors import TrainerError
from .config import ModelConfig

_GPT2 = dict(norm="layernorm", position="learned", mlp="gelu", bias=True, tied_embeddings=True)
_LLAMA = dict(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, tied_embeddings=False)

PRESETS: dict[str, ModelConfig] = {
    # tiny shapes that train in seconds on a CPU; used by tests and the README command
    "tiny": ModelConfig(hidden=64, layers=4, heads=4, kv_heads=2, ffn_hidden=128, max_seq_len=256, **_LLAMA),
    "tiny-gpt2": ModelConfig(hidden=64, layers=4, heads=4, max_seq_len=256, **_GPT2),
    "tiny-moe": ModelConfig(
        hidden=64,
        layers=4,
        heads=4,
        kv_heads=2,
        ffn_hidden=128,
        max_seq_len=256,
        num_experts=4,
        moe_topk=2,
        moe_every=2,
        moe_ffn_hidden=64,
        moe_aux_loss_coeff=0.01,
        **_LLAMA,
    ),
    "tiny-mla": ModelConfig(
        hidden=64,
        layers=4,
        heads=4,
        ffn_hidden=128,
        max_seq_len=256,
        attention="mla",
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        **_LLAMA,
    ),
    # Mamba-2, attention, Mamba-2, MLP (Nemotron-H style); 8 Mamba heads in 4 groups (TP x CP up to 4)
    "tiny-hybrid": ModelConfig(
        hidden=64,
        layers=4,
        heads=4,
        kv_heads=2,
        ffn_hidden=128,
        max_seq_len=256,
        layer_pattern="M*M-",
        mamba_state=16,
        mamba_head_dim=16,
        mamba_groups=4,
        mamba_chunk=16,
        **_LLAMA,
    ),
    # real shapes
    "gpt2": ModelConfig(hidden=768, layers=12, heads=12, vocab_size=50257, vocab_pad_multiple=128, **_GPT2),
    "gpt2-medium": ModelConfig(hidden=1024, layers=24, heads=16, vocab_size=50257, vocab_pad_multiple=128, **_GPT2),
    "gpt2-large": ModelConfig(hidden=1280, layers=36, heads=20, vocab_size=50257, vocab_pad_multiple=128, **_GPT2),
    "llama2-7b": ModelConfig(
        hidden=4096, layers=32, heads=32, ffn_hidden=11008, vocab_size=32000, max_seq_len=4096, **_LLAMA
    ),
    "llama3-8b": ModelConfig(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        ffn_hidden=14336,
        vocab_size=128256,
        max_seq_len=8192,
        rope_theta=500000.0,
        **_LLAMA,
    ),
    "llama3-70b": ModelConfig(
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        ffn_hidden=28672,
        vocab_size=128256,
        max_seq_len=8192,
        rope_theta=500000.0,
        **_LLAMA,
    ),
    "mixtral-8x7b": ModelConfig(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        ffn_hidden=14336,
        vocab_size=32000,
        max_seq_len=32768,
        rope_theta=1e6,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden=14336,
        **_LLAMA,
    ),
    "mixtral-8x22b": ModelConfig(
        hidden=6144,
        layers=56,
        heads=48,
        kv_heads=8,
        ffn_hidden=16384,
        vocab_size=32768,
        max_seq_len=65536,
        rope_theta=1e6,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden=16384,
        **_LLAMA,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset (``tiny``, ``tiny-gpt2``, ``tiny-moe``, ``gpt2``, ``llama3-8b``, ...)."""
    if name not in PRESETS:
        raise TrainerError(f"model preset {name!r}: unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
