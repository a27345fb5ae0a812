"""The Mamba-2 mixer's forward + backward time per token against ``transformers``' reference mixer (its
plain-PyTorch path) on CPU, and its scaling with the sequence length.

    python packages/trainer/benchmarks/bench_mamba.py [--seqs 512 1024 2048 4096 --threads 1]

Both mixers get the same weights (ours drawn as the trainer draws them, copied into the reference) and the
same input; their outputs must agree before timing. For each sequence length the two alternate for
``--rounds`` rounds and the best time of one forward + backward is reported per token (the best, not
the median: on a shared machine the other load only ever adds time), with the ratio
to the reference and, for ours, the time per token relative to the shortest sequence (flat: linear
scaling; the SSD scan is quadratic only within its fixed-size chunks).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import pstate
from trainer.model import ModelGroups, build_chunks, preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as Reference

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = preset("tiny-hybrid").with_overrides(
        hidden=args.hidden, heads=4, kv_heads=None, layers=1, layer_pattern="M", vocab_size=64, mamba_expand=2,
        mamba_head_dim=args.head_dim, mamba_state=args.state, mamba_groups=args.groups, mamba_chunk=args.chunk,
    )  # fmt: skip
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        mine = chunk.layers[0].mamba
        hf = Mamba2Config(
            hidden_size=cfg.hidden, num_heads=cfg.mamba_heads, head_dim=cfg.mamba_head_dim, expand=2,
            n_groups=cfg.mamba_groups, state_size=cfg.mamba_state, conv_kernel=cfg.mamba_conv,
            chunk_size=cfg.mamba_chunk, use_bias=False, use_conv_bias=True, layer_norm_epsilon=cfg.norm_eps,
            num_hidden_layers=1, vocab_size=64,
        )  # fmt: skip
        ref = Reference(hf, layer_idx=0)
        with torch.no_grad():
            ref.in_proj.weight.copy_(mine.in_proj.weight)
            ref.conv1d.weight.copy_(mine.conv.weight.unsqueeze(1))
            ref.conv1d.bias.copy_(mine.conv.bias)
            for name in ("A_log", "D", "dt_bias"):
                getattr(ref, name).copy_(getattr(mine, name))
            ref.norm.weight.copy_(mine.norm.weight)
            ref.out_proj.weight.copy_(mine.out_proj.weight)

        print(
            f"Mamba-2 mixer fwd+bwd, CPU fp32, threads={torch.get_num_threads()}: hidden={cfg.hidden} "
            f"heads={cfg.mamba_heads}x{cfg.mamba_head_dim} state={cfg.mamba_state} groups={cfg.mamba_groups} "
            f"chunk={cfg.mamba_chunk} batch={args.batch}"
        )
        print(f"{'seq':>6} {'ours us/tok':>12} {'ref us/tok':>11} {'ours/ref':>9} {'ours vs shortest':>17}")
        first = None
        for seq in args.seqs:
            x = torch.randn(args.batch, seq, cfg.hidden, generator=torch.Generator().manual_seed(seq))
            with torch.no_grad():
                torch.testing.assert_close(mine(x.transpose(0, 1)).transpose(0, 1), ref(x), rtol=1e-3, atol=1e-4)

            def step(module, inp) -> float:
                inp = inp.clone().requires_grad_()
                start = time.perf_counter()
                module(inp).square().mean().backward()
                return time.perf_counter() - start

            times: dict[str, list[float]] = {"ours": [], "ref": []}
            for _ in range(args.rounds):
                times["ours"].append(step(mine, x.transpose(0, 1)))
                times["ref"].append(step(ref, x))
            per_token = {k: min(v) / (seq * args.batch) * 1e6 for k, v in times.items()}
            first = first or per_token["ours"]
            print(
                f"{seq:>6} {per_token['ours']:>12.2f} {per_token['ref']:>11.2f} "
                f"{per_token['ours'] / per_token['ref']:>9.2f} {per_token['ours'] / first:>16.2f}x"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
