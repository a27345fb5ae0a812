"""Importing a Hugging Face Llama or Mixtral: peak resident memory per rank and time, against the size
of the rank's pieces, and against ``transformers``' ``from_pretrained`` of the same folder in one process.

    python packages/trainer/benchmarks/bench_hf_import.py [--hidden 1024 --layers 8 --vocab 32000]
    python packages/trainer/benchmarks/bench_hf_import.py --experts 8 --moe-ffn 2816 [--hf DIR]

With ``--experts`` the model is a Mixtral (the layouts: EP2, and TP2xEP4 with sequence parallelism,
whose experts are split over ETP2), and the floats drawn for the experts' weights while building are
counted against the floats of the rank's expert pieces (1.0: each rank draws only its own experts; 2.0
at ETP2, where the other half of each expert is drawn and dropped), with the largest part of an expert
held at once while drawing (a streamed chunk, or a whole expert weight).
``--hf DIR`` saves the random model there, or reuses the one already there (skipping the one-process
timings).

A random Llama of the given shape is made with ``transformers`` and saved (fp32 safetensors). Then, on
8 gloo ranks (``pstate.testing.Harness``) at TP2 x PP2 x DP2 and at TP8, each rank builds its model
chunk (the random initialisation), then fills it from the folder with ``load_hf_pieces`` (reading only
its slices). Reported per layout, as the maximum over ranks: the resident set before building (the
libraries: the fixed overhead), the growth of the peak resident set (``VmHWM``, reset before each
phase through ``/proc/self/clear_refs``) while building and while loading, measured from that base,
and the bytes of the rank's pieces. Pages of the safetensors files mapped while reading count as
resident. Also timed: ``import_from_hf`` (``trainer convert --from-hf``) in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import torch


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024


def reset_peak() -> float:
    """Reset the peak resident set (VmHWM) to the current one, which is returned."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS:")


def measure(hf: str, parallel: dict) -> dict:
    import pstate
    from trainer.convert import _hf_run
    from trainer.hf.stream import load_hf_pieces
    from trainer.model import ModelGroups, build_chunks

    cfg = _hf_run(hf).model
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps, count_expert_draws() as drawn:
        base = reset_peak()
        began = time.perf_counter()
        groups = ModelGroups.from_state(ps, sequence_parallel=ps.tp.size > 1 and cfg.num_experts > 0)
        chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=0)
        built, build_peak = time.perf_counter() - began, status_mib("VmHWM:") - base
        expert_floats = sum(p.numel() for c in chunks for n, p in c.named_parameters() if ".experts." in n)
        reset_peak()
        began = time.perf_counter()
        load_hf_pieces(chunks, hf)
        loaded, load_peak = time.perf_counter() - began, status_mib("VmHWM:") - base
        anon = status_mib("RssAnon:")  # without the file pages the reads mapped (reclaimable page cache)
        pieces = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()) / 2**20
        del chunks
        drawn_ratio = drawn[0] / expert_floats if expert_floats else 0.0
        return dict(
            base=base, build=build_peak, load=load_peak, anon=anon, pieces=pieces, t_build=built, t_load=loaded,
            experts=expert_floats * 4 / 2**20, drawn=drawn_ratio, held=drawn[1] / 2**20,
        )  # fmt: skip


@contextlib.contextmanager
def count_expert_draws():
    """Counts the floats drawn for the experts' weights (the yielded list's first entry) and the largest
    piece of them held at once (in bytes, its second): the row chunks ``moe_dispatch`` streams them in
    (``experts.draw_chunk``), or the whole experts where it draws them whole."""
    import moe_dispatch.experts as experts

    drawn = [0, 0]
    whole, chunk = experts.full_expert_weights, getattr(experts, "draw_chunk", None)

    def counting_whole(*args, **kwargs):
        fc1, fc2 = whole(*args, **kwargs)
        drawn[0] += fc1.numel() + fc2.numel()
        drawn[1] = max(drawn[1], 4 * fc1.numel())
        return fc1, fc2

    def counting_chunk(rows, cols, *rest):
        drawn[0] += rows * cols
        drawn[1] = max(drawn[1], 4 * rows * cols)
        return chunk(rows, cols, *rest)

    experts.full_expert_weights = counting_whole
    if chunk is not None:
        experts.draw_chunk = counting_chunk
    try:
        yield drawn
    finally:
        experts.full_expert_weights = whole
        if chunk is not None:
            experts.draw_chunk = chunk


def import_one_process(hf: str, save: str) -> float:
    from trainer.convert import import_from_hf

    began = time.perf_counter()
    import_from_hf(hf, save)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=0, help="a Mixtral with this many experts (top-2)")
    parser.add_argument("--moe-ffn", type=int, default=2816)
    parser.add_argument("--hf", default=None, help="save the model here, or reuse the one saved here")
    args = parser.parse_args()

    import transformers

    from pstate.testing import Harness

    shape = dict(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=2048,
    )  # fmt: skip
    if args.experts:
        kind = "Mixtral"
        config = transformers.MixtralConfig(
            **shape, intermediate_size=args.moe_ffn, num_local_experts=args.experts, num_experts_per_tok=2
        )
        layouts = (("EP2", dict(ep=2)), ("TP2xEP4", dict(tp=2, ep=4)))
    else:
        kind, config = "Llama", transformers.LlamaConfig(**shape, intermediate_size=args.ffn)
        layouts = (("TP2xPP2xDP2", dict(tp=2, pp=2)), ("TP8", dict(tp=8)))
    with tempfile.TemporaryDirectory() as scratch:
        hf = args.hf or scratch
        fresh = not os.path.isfile(os.path.join(hf, "config.json"))
        if fresh:
            model = transformers.AutoModelForCausalLM.from_config(config)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(hf)
            del model
            print(f"{kind} {shape}, ffn {args.moe_ffn if args.experts else args.ffn}, experts {args.experts}: ")
            print(f"{params / 1e6:.0f}M parameters, {params * 4 / 2**20:.0f} MiB in fp32")
        with Harness(timeout_s=1800, threads=1) as harness:
            if fresh:
                began = time.perf_counter()
                transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
                print(f"transformers from_pretrained, one process: {time.perf_counter() - began:.2f} s")
                (t_ours,) = harness.run(1, import_one_process, hf, tempfile.mkdtemp() + "/ckpt")
                print(f"trainer convert --from-hf (import_from_hf), one process: {t_ours:.2f} s")
            for name, parallel in layouts:
                results = harness.run(8, measure, hf, parallel)
                top = {k: max(r[k] for r in results) for k in results[0]}
                experts = (
                    f"; expert pieces {top['experts']:.0f} MiB, expert floats drawn / held {top['drawn']:.2f}, "
                    f"largest part of an expert held while drawing {top['held']:.1f} MiB"
                    if args.experts
                    else ""
                )
                print(
                    f"{name:12} per rank (max over 8): pieces {top['pieces']:.0f} MiB; resident before "
                    f"{top['base']:.0f} MiB; peak growth building {top['build']:.0f} MiB, loading "
                    f"{top['load']:.0f} MiB (anonymous after loading {top['anon']:.0f} MiB); "
                    f"build {top['t_build']:.2f} s, load {top['t_load']:.2f} s{experts}"
                )


if __name__ == "__main__":
    main()
