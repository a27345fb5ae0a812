"""Generation with and without the KV cache: tokens/s of greedy decoding on a small model, in one process.

    python packages/trainer/benchmarks/bench_generate.py [--preset tiny-gpt2 --new 300 --threads 1]

The model is the preset widened to ``--hidden`` (random weights, ``init_std`` 0.1 so that greedy decoding
does not repeat one token); ``trainer.generate.decode`` produces ``--new`` tokens after a ``--prompt``-token
prompt with ``use_cache=True`` (prefill, then one token per forward) and ``use_cache=False`` (the whole
context every token). The two must give the same tokens before timing; they alternate for ``--rounds``
rounds and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import pstate
from trainer.generate import decode
from trainer.model import ModelGroups, build_chunks, preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny (Llama shape) or tiny-gpt2")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    base = preset(args.preset)
    cfg = base.with_overrides(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=base.kv_heads and args.heads // 2,
        ffn_hidden=None, vocab_size=args.vocab, max_seq_len=args.prompt + args.new, init_std=0.1,
    )  # fmt: skip
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        chunk.eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

        def run(use_cache: bool) -> tuple[list[int], float]:
            start = time.perf_counter()
            out = decode(
                chunk, prompt, max_new_tokens=args.new, temperature=0.0, top_k=None, generator=torch.Generator(),
                use_cache=use_cache,
            )  # fmt: skip
            return out, time.perf_counter() - start

        cached, _ = run(True)
        uncached, _ = run(False)
        if cached != uncached:
            raise SystemExit("the cached and uncached generations differ")
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for use_cache in (True, False):
                times[use_cache].append(run(use_cache)[1])
        params = sum(p.numel() for p in chunk.parameters()) / 1e6
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}, {params:.1f}M parameters")
        shape = f"hidden {cfg.hidden}, layers {cfg.layers}, heads {cfg.heads}/{cfg.num_kv_heads}, vocab {args.vocab}"
        print(f"{shape}; prompt {args.prompt} tokens, {args.new} new tokens (greedy, batch 1), same tokens both ways")
        rate = {use_cache: args.new / statistics.median(t) for use_cache, t in times.items()}
        for use_cache, name in ((True, "KV cache"), (False, "no cache")):
            print(f"{name:9} {rate[use_cache]:8.1f} tokens/s  ({statistics.median(times[use_cache]):.2f} s)")
        print(f"speed-up with the cache: {rate[True] / rate[False]:.1f}x")


if __name__ == "__main__":
    main()
