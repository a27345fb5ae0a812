"""Packed sequences: each document of a packed batch has the loss and gradients of that document trained alone.

The packed batch (two samples of several documents, boundaries inside and across the zigzag chunks of CP2)
runs with its ``documents`` tensor on one process and split over CP2 (ring and Ulysses), TP2 with sequence
parallelism and TP2+CP2; the reference runs every document alone on one process, unpacked (``[1, length]``
token ids, no documents tensor). For each document the packed run backpropagates the summed token losses of
that document only (the other labels are ``-100``), so its gradient must be the document's own: any
attention across documents, a position that does not restart, or a target crossing a document boundary
changes it. Gradients are reduced as the training loop does (summed over CP, SP-replicated ones over TP).

Tolerance: rtol 1e-5, atol 1e-6 on fp32, as the model parity test: masking only removes terms, and the
splits only reorder sums; a mask leak or a shifted position is off by O(1e-2) or more.
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import cp_ring
import pstate
from tp_layers import allreduce_sequence_parallel_grads, vocab_parallel_cross_entropy
from trainer.model import ModelGroups, build_chunks, documents_tensor, model_shards, preset
from trainer.model.shards import assemble

SEED, SEQ, VOCAB = 7, 16, 97
LENGTHS = ([3, 6, 7], [9, 7])  # the documents of each packed sample


def config(name):
    return replace(preset(name), vocab_size=VOCAB)


def documents():
    """``[(sample, start, length)]`` of every document, in order."""
    out = []
    for b, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            out.append((b, start, n))
            start += n
    return out


def tokens():
    return torch.randint(0, VOCAB, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(5))


def doc_labels(ids, start, n):
    """The next token within the document; the document's last token has no target (-100)."""
    labels = torch.full((n,), -100)
    labels[:-1] = ids[start + 1 : start + n]
    return labels


def token_loss(chunk, ids, labels, cfg, groups, documents=None):
    logits = chunk(ids) if documents is None else chunk(ids, documents)
    return vocab_parallel_cross_entropy(logits, labels.t(), group=groups.tp, vocab_size=cfg.vocab_size)


def run_alone(model_name):
    """Every document alone, unpacked: (summed loss, gradient pieces) per document."""
    cfg = config(model_name)
    results = []
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        groups = ModelGroups.from_state(ps)
        (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
        ids = tokens()
        for b, start, n in documents():
            chunk.zero_grad(set_to_none=True)
            doc = ids[b, start : start + n]
            loss = token_loss(chunk, doc[None], doc_labels(doc, 0, n)[None], cfg, groups).sum()
            loss.backward()
            results.append((loss.item(), model_shards([chunk], grads=True)))
    return results


def run_packed(model_name, parallel, sp=False, cp_attention="ring"):
    """The packed batch, split over ``parallel``: (summed loss, gradient pieces) per document."""
    cfg = config(model_name)
    results = []
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp, cp_attention=cp_attention)
        (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
        ids, doc_ids = tokens(), torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
        for i, (b, start, n) in enumerate(documents()):
            doc_ids[b, start : start + n] = i
        docs = documents_tensor(doc_ids)
        shard = (lambda t, dim: cp_ring.shard_sequence(t, group=ps.cp, dim=dim)) if ps.cp.size > 1 else None
        for b, start, n in documents():
            chunk.zero_grad(set_to_none=True)
            labels = torch.full((len(LENGTHS), SEQ), -100)
            labels[b, start : start + n] = doc_labels(ids[b], start, n)
            local = (ids, labels, docs) if shard is None else (shard(ids, 1), shard(labels, 1), shard(docs, 2))
            loss = token_loss(chunk, local[0], local[1], cfg, groups, local[2]).sum()
            loss.backward()
            allreduce_sequence_parallel_grads(chunk, group=ps.tp)
            for p in chunk.parameters():
                dist.all_reduce(p.grad, group=ps.dp_cp.group)
            total = loss.detach().clone()
            dist.all_reduce(total, group=ps.dp_cp.group)
            results.append((total.item(), model_shards([chunk], grads=True)))
    return results


CASES = {
    "one-process": ("tiny", {}, 1, {}),
    "cp2-ring": ("tiny", dict(cp=2), 2, {}),
    "cp2-ulysses": ("tiny", dict(cp=2), 2, dict(cp_attention="ulysses")),
    "tp2-sp": ("tiny", dict(tp=2), 2, dict(sp=True)),
    "gpt2-cp2-learned-positions": ("tiny-gpt2", dict(cp=2), 2, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_each_packed_document_equals_the_document_alone(run_ranks, case):
    name, parallel, world, options = CASES[case]
    ((alone),) = run_ranks(1, run_alone, name)
    results = run_ranks(world, run_packed, name, parallel, **options)
    for d, (ref_loss, ref) in enumerate(alone):
        for rank_results in results:
            assert rank_results[d][0] == pytest.approx(ref_loss, rel=1e-5), f"{case} document {d} loss"
        for key, full in ref.items():
            got = assemble([r[d][1][key] for r in results if key in r[d][1]])
            torch.testing.assert_close(
                got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key, d=d: f"{case} document {d} {key}: {m}"
            )
