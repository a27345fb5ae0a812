"""Our GPT model in one process against a plain PyTorch model of the same shape and math.

    python packages/trainer/benchmarks/bench_model.py [--hidden 512 --layers 4 --seq 256 --batch 8 --iters 5]

The plain model (``Plain`` below: ``nn.Embedding``, ``nn.RMSNorm``, fused ``nn.Linear`` QKV, rotary,
``F.scaled_dot_product_attention`` with GQA, SwiGLU, ``F.cross_entropy``) takes our model's weights, and
the two losses must agree before timing. Each measurement is forward + loss + backward; the two
alternate for ``--rounds`` rounds and the median is reported. Also reported: the model FLOP/s
(``trainer.train.flops.flops_per_token``) against the measured rate of a square matmul (MFU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pstate
from trainer.model import ModelGroups, build_chunks, lm_loss, preset
from trainer.model.rotary import apply_rotary, inverse_frequencies, rotary_angles
from trainer.train.flops import flops_per_token, measured_matmul_flops


class Plain(nn.Module):
    """The same decoder written directly in PyTorch (Llama shape: RMSNorm, rotary, GQA, SwiGLU, untied)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.head_dim
        self.embedding = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList()
        for _ in range(cfg.layers):
            layer = nn.Module()
            layer.norm1, layer.norm2 = nn.RMSNorm(h, eps=cfg.norm_eps), nn.RMSNorm(h, eps=cfg.norm_eps)
            layer.qkv = nn.Linear(h, (cfg.heads + 2 * cfg.num_kv_heads) * d, bias=False)
            layer.proj = nn.Linear(cfg.heads * d, h, bias=False)
            layer.fc1 = nn.Linear(h, 2 * cfg.ffn, bias=False)
            layer.fc2 = nn.Linear(cfg.ffn, h, bias=False)
            self.layers.append(layer)
        self.final_norm = nn.RMSNorm(h, eps=cfg.norm_eps)
        self.head = nn.Linear(h, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg, d = self.cfg, self.cfg.head_dim
        x = self.embedding(ids)  # [batch, seq, hidden]
        b, s, _ = x.shape
        cos, sin = rotary_angles(torch.arange(s), inverse_frequencies(cfg))
        for layer in self.layers:
            q, k, v = layer.qkv(layer.norm1(x)).split([cfg.heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d], -1)
            q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + layer.proj(a.transpose(1, 2).reshape(b, s, -1))
            gate, up = layer.fc1(layer.norm2(x)).chunk(2, -1)
            x = x + layer.fc2(F.silu(gate) * up)
        logits = self.head(self.final_norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))


def copy_weights(plain: Plain, ours) -> None:
    with torch.no_grad():
        plain.embedding.weight.copy_(ours.embedding.weight[: plain.cfg.vocab_size])
        for p_layer, o_layer in zip(plain.layers, ours.layers):
            p_layer.norm1.weight.copy_(o_layer.norm1.weight)
            p_layer.norm2.weight.copy_(o_layer.norm2.weight)
            p_layer.qkv.weight.copy_(o_layer.attn.qkv.weight)
            p_layer.proj.weight.copy_(o_layer.attn.proj.weight)
            p_layer.fc1.weight.copy_(o_layer.mlp.fc1.weight)
            p_layer.fc2.weight.copy_(o_layer.mlp.fc2.weight)
        plain.final_norm.weight.copy_(ours.final_norm.weight)
        plain.head.weight.copy_(ours.head.weight[: plain.cfg.vocab_size])


def timed(step, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = preset("tiny").with_overrides(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        ffn_hidden=None, vocab_size=args.vocab, max_seq_len=args.seq,
    )  # fmt: skip
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        groups = ModelGroups.from_state(ps)
        (ours,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=0)
        plain = Plain(cfg)
        copy_weights(plain, ours)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        ids, labels = tokens[:, :-1], tokens[:, 1:]

        def step_ours() -> torch.Tensor:
            loss = lm_loss(ours(ids), labels, cfg=cfg, groups=groups)
            loss.backward()
            return loss

        def step_plain() -> torch.Tensor:
            loss = plain(ids, labels)
            loss.backward()
            return loss

        a, b = step_ours().item(), step_plain().item()
        if abs(a - b) > 1e-5 * abs(b):
            raise SystemExit(f"the two models disagree: loss {a} vs {b}")
        ours_s, plain_s = [], []
        for _ in range(args.rounds):
            ours_s.append(timed(step_ours, args.iters))
            plain_s.append(timed(step_plain, args.iters))
        t_ours, t_plain = statistics.median(ours_s), statistics.median(plain_s)
        tokens_per_step = args.batch * args.seq
        flops = flops_per_token(cfg, args.seq) * tokens_per_step
        peak = measured_matmul_flops().flops
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {params:.1f}M parameters")
        shape = f"heads {cfg.heads}/{cfg.num_kv_heads}, ffn {cfg.ffn}, vocab {cfg.vocab_size}"
        print(f"hidden {cfg.hidden}, layers {cfg.layers}, {shape}, seq {args.seq}, batch {args.batch}")
        print(f"loss ours {a:.6f}, plain {b:.6f}")
        for name, t in (("ours", t_ours), ("plain", t_plain)):
            rate = f"{tokens_per_step / t:9.0f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s"
            print(f"{name:6} {t * 1e3:8.1f} ms/step  {rate}")
        print(f"overhead of ours: {100 * (t_ours / t_plain - 1):+.1f}% (target <= 3%)")
        print(f"measured matmul peak {peak / 1e9:.1f} GFLOP/s; MFU ours {100 * flops / t_ours / peak:.1f}%")


if __name__ == "__main__":
    main()
