"""Packed sequences against one document per padded sample and against windows cut across documents.

    python packages/trainer/benchmarks/bench_packing.py [--docs 600 --seq 1024 --median 200 --sigma 1.0
        --hidden 128 --layers 2 --batch 4 --iters 3]

Fine-tuning-like data: document lengths drawn log-normal (median ``--median`` tokens, log-space spread
``--sigma``: a long tail past ``seq``), random token ids, written as an indexed dataset. Three ways to make
``seq``-token samples of it:

- ``padded``: one document per sample (longer ones cut into ``seq`` pieces), padded to ``seq``;
- ``windows``: today's :class:`~trainer.data.SampleDataset`, the documents end to end cut into windows,
  attention across document boundaries (no masks);
- ``packed``: :class:`~trainer.data.PackedDataset` with document masks and restarting positions.

For each, over a whole epoch: the share of sample tokens that are padding, and the share of the causal
attention's query/key pairs that are not inside one document (padding or cross-document pairs: computed
and wasted, or in ``windows`` computed and *used*, mixing documents). Then the model's forward + backward is
timed on the first batches (one process, ``--threads`` CPU threads) and the rate of useful tokens (document
tokens) per second reported. The dense mask kernel on CPU still computes the masked pairs; a block-sparse or
varlen kernel would skip them (the CP ring already skips whole blocks that share no document).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import pstate
from trainer.data import IGNORE, PackedDataset, SampleDataset, write_dataset
from trainer.data.packing import split_pieces
from trainer.model import ModelGroups, build_chunks, documents_tensor, lm_loss, preset


def lognormal_lengths(n: int, median: float, sigma: float, seed: int) -> np.ndarray:
    return np.maximum(2, np.random.default_rng(seed).lognormal(np.log(median), sigma, n).round().astype(np.int64))


def causal_pairs(lengths) -> int:
    lengths = np.asarray(lengths, dtype=np.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def padded_samples(data, seq: int) -> list[np.ndarray]:
    """One document piece per ``[3, seq]`` sample, padded (inputs, targets, document ids as in packing)."""
    out = []
    doc, offset, length = split_pieces(data.doc_lengths, seq)
    for d, o, n in zip(doc.tolist(), offset.tolist(), length.tolist()):
        tokens = data[d]
        sample = np.zeros((3, seq), dtype=np.int64)
        sample[1], sample[2, n:] = IGNORE, 1
        sample[0, :n] = tokens[o : o + n]
        stop = min(o + n + 1, len(tokens))
        sample[1, : stop - o - 1] = tokens[o + 1 : stop]
        out.append(sample)
    return out


def window_document_pieces(ds: SampleDataset) -> list[np.ndarray]:
    """The lengths of the document pieces in each window of epoch 0 (the inputs, ``seq`` tokens)."""
    _, starts, _ = ds._epoch(0)
    pieces = []
    for k in range(ds.samples_per_epoch):
        lo, hi = k * ds.seq_len, (k + 1) * ds.seq_len
        cuts = starts[(starts > lo) & (starts < hi)]
        pieces.append(np.diff(np.concatenate([[lo], cuts, [hi]])))
    return pieces


def shares(seq: int, samples: int, doc_tokens: int, same_doc_pairs: int) -> tuple[float, float]:
    """(padding share of tokens, share of causal attention pairs not inside one document)."""
    return 1 - doc_tokens / (samples * seq), 1 - same_doc_pairs / (samples * seq * (seq + 1) // 2)


def timed_rate(chunk, cfg, groups, batches, useful_per_sample: float, iters: int) -> float:
    """Useful tokens per second of forward + backward over ``batches`` (``(ids, labels, documents|None)``)."""

    def step(ids, labels, docs):
        logits = chunk(ids) if docs is None else chunk(ids, docs)
        lm_loss(logits, labels, cfg=cfg, groups=groups).backward()

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(iters):
        step(*batches[i % len(batches)])
    seconds = (time.perf_counter() - start) / iters
    return useful_per_sample * batches[0][0].size(0) / seconds


def to_batches(samples, batch: int, masked: bool, count: int):
    out = []
    for b in range(count):
        arr = torch.from_numpy(np.stack(samples[b * batch : (b + 1) * batch]))
        if arr.dim() == 2:  # windows: [batch, seq + 1]
            out.append((arr[:, :-1], arr[:, 1:], None))
        else:
            out.append((arr[:, 0], arr[:, 1], documents_tensor(arr[:, 2]) if masked else None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--median", type=float, default=200)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seq = args.seq

    lengths = lognormal_lengths(args.docs, args.median, args.sigma, seed=0)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        docs = [rng.integers(0, 256, n) for n in lengths]
        data = write_dataset(f"{tmp}/ft", docs, vocab_size=256, meta={"tokenizer": "byte"})
        padded = padded_samples(data, seq)
        windows = SampleDataset(data, seq, seed=0)
        packed = PackedDataset(data, seq, seed=0)
        pieces = split_pieces(data.doc_lengths, seq)[2]
        rows = {
            "padded": (padded, len(padded), causal_pairs(pieces)),
            "windows": (
                [windows[g] for g in range(args.batch * 2)],
                windows.samples_per_epoch,
                sum(causal_pairs(p) for p in window_document_pieces(windows)),
            ),
            "packed": (
                [packed[g] for g in range(args.batch * 2)],
                packed.samples_per_epoch,
                causal_pairs([n for k in range(packed.samples_per_epoch) for _, _, n in packed.pieces(k)]),
            ),
        }
        total = int(lengths.sum())
        print(
            f"{args.docs} documents, log-normal lengths: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
            f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()} tokens; {total} tokens; seq {seq}"
        )

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cfg = preset("tiny").with_overrides(
            hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads, ffn_hidden=None,
            vocab_size=256, max_seq_len=seq,
        )  # fmt: skip
        with pstate.initialize(pstate.ParallelConfig()) as ps:
            groups = ModelGroups.from_state(ps)
            (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=0)
            print(f"{'samples':>8} {'padding':>8} {'attn pairs outside a doc':<33} {'useful tok/s':>13}  mode")
            for mode, (samples, count, same_doc) in rows.items():
                useful = seq * count if mode == "windows" else total  # windows drop the epoch's last partial one
                pad, cross = shares(seq, count, useful, same_doc)
                batches = to_batches(samples, args.batch, masked=mode == "packed", count=2)
                rate = timed_rate(chunk, cfg, groups, batches, useful / count, args.iters)
                what = {"padded": "wasted", "windows": "USED: mixes documents", "packed": "masked"}[mode]
                print(f"{count:>8} {pad:>8.1%} {cross:>10.1%} {what:<22} {rate:>13.0f}  {mode}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
