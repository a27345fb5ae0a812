"""Inference throughput: one request at a time, static batching, continuous batching under Poisson arrivals,
and ``transformers``' ``generate`` on the same model exported to Hugging Face's format, in one run.

    python packages/trainer/benchmarks/bench_infer.py [--hidden 1024 --layers 16 --requests 8 --threads 2]

The model is a Llama-shaped GPT (``--hidden``, ``--layers``, SwiGLU, byte vocabulary; random weights,
about 200M parameters at the defaults), saved as a checkpoint and exported with ``trainer convert``. Requests
have mixed prompt lengths (16..96 tokens) and output lengths (``--min-new``..``--max-new``), greedy, EOS
ignored. (a) ``max_seqs=1``: one at a time. (b) ``policy="static"``: all in one batch. (c) continuous, the
requests arriving as a Poisson process of rate ``--rate``/s: throughput, time to first token and time per
output token (p50/p99). (d) ``transformers`` at the same batch (left padding, ``--max-new`` tokens each)
against our static batch with the same fixed lengths; their greedy tokens are checked to be equal.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ckpt
import pstate
from trainer.config import load_run_config, to_toml
from trainer.convert import export_to_hf
from trainer.infer import Engine, ModelRunner, Request, SamplingParams
from trainer.model import ModelGroups, build_chunks, model_shards


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def run(engine: Engine, requests: list[Request], arrivals: list[float]) -> dict[str, float]:
    """Feed ``requests`` at ``arrivals`` (seconds from the start) and step until all are done."""
    start, seqs, pending = time.perf_counter(), [], list(zip(arrivals, requests))
    while pending or engine.scheduler.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, request = pending.pop(0)
            seqs.append(engine.sequence(request))
            engine.timings[seqs[-1].id].arrived = start + arrivals[len(seqs) - 1]
            engine.scheduler.add(seqs[-1])
        if engine.scheduler.has_work():
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    timings = [engine.timings[s.id] for s in seqs]
    tokens = sum(len(s.output) for s in seqs)
    ttft = [t.tokens[0] - t.arrived for t in timings]
    tpot = [(t.tokens[-1] - t.tokens[0]) / (len(t.tokens) - 1) for t in timings if len(t.tokens) > 1]
    return {
        "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99), "steps": engine.steps,
        "outputs": [s.output for s in seqs],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--min-new", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=24)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours against transformers (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rng = random.Random(0)
    cfg = load_run_config(overrides={"model": {
        "preset": "tiny", "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
        "kv_heads": args.heads, "ffn_hidden": None, "max_seq_len": 512,
    }})  # fmt: skip
    model = cfg.model.with_overrides(vocab_size=257)
    with pstate.initialize(pstate.ParallelConfig()) as ps, tempfile.TemporaryDirectory() as tmp:
        (chunk,) = build_chunks(model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
        chunk.eval()
        params = sum(p.numel() for p in chunk.parameters())
        print(f"model: hidden {args.hidden}, {args.layers} layers, {params / 1e6:.0f}M parameters, fp32; "
              f"{args.requests} requests, torch threads {args.threads}", flush=True)  # fmt: skip
        prompts = [[rng.randrange(256) for _ in range(rng.randint(16, 96))] for _ in range(args.requests)]
        lengths = [rng.randint(args.min_new, args.max_new) for _ in prompts]
        mixed = [
            Request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts, lengths)
        ]
        at_zero = [0.0] * len(prompts)
        t, arrivals = 0.0, []
        for _ in prompts:
            t += rng.expovariate(args.rate)
            arrivals.append(t)

        def engine(**options) -> Engine:
            return Engine(ModelRunner(chunk, num_blocks=256, block_size=16), max_batch_tokens=512, **options)

        results = {
            "one at a time": run(engine(max_seqs=1), mixed, at_zero),
            "static batch": run(engine(policy="static"), mixed, at_zero),
            f"continuous, Poisson {args.rate}/s": run(engine(), mixed, arrivals),
        }
        reference = results["one at a time"]["outputs"]
        assert all(r["outputs"] == reference for r in results.values()), "batched tokens differ from solo"
        base = results["one at a time"]["tok_per_s"]
        print(f"{'mode':<28}{'tokens':>7}{'wall s':>8}{'tok/s':>8}{'x':>6}{'TTFT p50/p99 s':>17}{'TPOT p50/p99 s':>17}")
        for name, r in results.items():
            speed = f"{r['tokens']:>7}{r['wall_s']:>8.2f}{r['tok_per_s']:>8.1f}{r['tok_per_s'] / base:>6.2f}"
            latency = f"{r['ttft_p50']:>8.2f} /{r['ttft_p99']:>6.2f}{r['tpot_p50']:>9.3f} /{r['tpot_p99']:>6.3f}"
            print(f"{name:<28}{speed}{latency}")

        # transformers at equal batch: every request the same number of new tokens; the two alternate for
        # --rounds rounds and the best of each is kept (the machine's load moves between runs)
        fixed = [Request(p, SamplingParams(max_tokens=args.max_new, temperature=0, ignore_eos=True)) for p in prompts]
        save = Path(tmp) / "ckpt"
        ckpt.save({"model": model_shards([chunk]), "config": to_toml(cfg)}, ckpt.step_dir(save, 0))
        hf_dir = export_to_hf(save, Path(tmp) / "hf")
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        ours_s, hf_s = [], []
        for _ in range(args.rounds):
            ours = run(engine(policy="static"), fixed, at_zero)
            ours_s.append(ours["wall_s"])
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new, do_sample=False,
                    min_new_tokens=args.max_new, pad_token_id=0,
                )  # fmt: skip
            hf_s.append(time.perf_counter() - start)
        wall = min(hf_s)
        ours["tok_per_s"] = ours["tokens"] / min(ours_s)
        hf_tokens = out[:, width:].tolist()
        same = sum(a == b for a, b in zip(hf_tokens, ours["outputs"]))
        n = len(prompts) * args.max_new
        print(
            f"equal batch of {len(prompts)} x {args.max_new} new tokens: ours (static) {ours['tok_per_s']:.1f} tok/s, "
            f"transformers generate {n / wall:.1f} tok/s; greedy tokens identical for {same}/{len(prompts)} requests"
        )


if __name__ == "__main__":
    main()
