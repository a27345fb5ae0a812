"""Importing a Hugging Face Llama: peak resident memory per rank and time, against the size of the
rank's pieces, and against ``transformers``' ``from_pretrained`` of the same folder in one process.

    python packages/trainer/benchmarks/bench_hf_import.py [--hidden 1024 --layers 8 --vocab 32000]

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
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        base = reset_peak()
        began = time.perf_counter()
        chunks = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=ps.pp.rank, pp=ps.pp.size, seed=0)
        built, build_peak = time.perf_counter() - began, status_mib("VmHWM:") - base
        reset_peak()
        began = time.perf_counter()
        load_hf_pieces(chunks, hf)
        loaded, load_peak = time.perf_counter() - began, status_mib("VmHWM:") - base
        anon = status_mib("RssAnon:")  # without the file pages the reads mapped (reclaimable page cache)
        pieces = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()) / 2**20
        del chunks
        return dict(base=base, build=build_peak, load=load_peak, anon=anon, pieces=pieces, t_build=built, t_load=loaded)


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
    args = parser.parse_args()

    import transformers

    from pstate.testing import Harness

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, vocab_size=args.vocab,
        max_position_embeddings=2048,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as hf:
        model = transformers.LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(hf)
        del model
        began = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        t_hf = time.perf_counter() - began
        print(f"Llama hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, ")
        print(f"vocab {args.vocab}: {params / 1e6:.0f}M parameters, {params * 4 / 2**20:.0f} MiB in fp32")
        print(f"transformers from_pretrained, one process: {t_hf:.2f} s")
        with Harness(timeout_s=1800, threads=1) as harness:
            (t_ours,) = harness.run(1, import_one_process, hf, tempfile.mkdtemp() + "/ckpt")
            print(f"trainer convert --from-hf (import_from_hf), one process: {t_ours:.2f} s")
            for name, parallel in (("TP2xPP2xDP2", dict(tp=2, pp=2)), ("TP8", dict(tp=8))):
                results = harness.run(8, measure, hf, parallel)
                top = {k: max(r[k] for r in results) for k in results[0]}
                print(
                    f"{name:12} per rank (max over 8): pieces {top['pieces']:.0f} MiB; resident before "
                    f"{top['base']:.0f} MiB; peak growth building {top['build']:.0f} MiB, loading "
                    f"{top['load']:.0f} MiB (anonymous after loading {top['anon']:.0f} MiB); "
                    f"build {top['t_build']:.2f} s, load {top['t_load']:.2f} s"
                )


if __name__ == "__main__":
    main()
