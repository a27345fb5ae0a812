"""KV-cache bytes per token: multi-latent attention against standard attention at the same model width.

    python packages/trainer/benchmarks/bench_mla_cache.py [--dtype bfloat16]

Each model is a ``ModelConfig``; its cache is measured by building the cache objects ``trainer generate``
uses (``LatentCache`` for MLA, ``KVCache`` otherwise) for one position of one layer and summing their
bytes, then multiplying by the layers. The shapes: DeepSeek-V3 (hidden 7168, 61 layers, 128 heads, MLA
with a 512-wide latent and a 64-wide rotary key), the same width with multi-head attention (128 heads of
56), and a Llama-shaped grouped-query model of that width (56 heads of 128, 8 key/value heads). The last
row is what MLA would cache if it kept its up-projected keys and values instead of the latent.
"""

from __future__ import annotations

import argparse

import torch

from trainer.model import KVCache, LatentCache, ModelConfig

WIDTH, LAYERS = 7168, 61
MODELS = {
    "DeepSeek-V3 MLA (latent cache)": ModelConfig(
        hidden=WIDTH,
        layers=LAYERS,
        heads=128,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
    "MHA, 128 heads x 56": ModelConfig(hidden=WIDTH, layers=LAYERS, heads=128),
    "Llama-shaped GQA, 56 heads x 128, 8 kv": ModelConfig(hidden=WIDTH, layers=LAYERS, heads=56, kv_heads=8),
}


def layer_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one layer's cache holds per token, from the cache object itself."""
    if cfg.attention == "mla":
        cache = LatentCache(1, 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device="meta")
        return sum(t.numel() * t.element_size() for t in (cache.latents, cache.rotary))
    cache = KVCache(1, cfg.num_kv_heads, 1, cfg.head_dim, dtype=dtype, device="meta")
    return sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = {name: layer_bytes_per_token(cfg, dtype) for name, cfg in MODELS.items()}
    mla = MODELS["DeepSeek-V3 MLA (latent cache)"]
    size = torch.finfo(dtype).bits // 8
    rows["DeepSeek-V3 MLA, expanded keys/values"] = mla.heads * (mla.head_dim + mla.v_head_dim) * size
    base = rows["DeepSeek-V3 MLA (latent cache)"]
    print(f"KV cache per token ({args.dtype}), hidden {WIDTH}, {LAYERS} layers")
    print(f"{'model':44s} {'B/token/layer':>14s} {'KiB/token':>10s} {'GiB @128k':>10s} {'x MLA':>7s}")
    for name, per_layer in rows.items():
        total = per_layer * LAYERS
        sequence = total * 131072 / 2**30
        print(f"{name:44s} {per_layer:14,d} {total / 2**10:10.1f} {sequence:10.1f} {per_layer / base:7.1f}")


if __name__ == "__main__":
    main()
