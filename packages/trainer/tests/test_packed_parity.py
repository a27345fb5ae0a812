"""Packed sequences: each document of a packed batch has the loss and gradients of that document trained alone.

The packed batch (two samples of several documents, boundaries inside and across the zigzag chunks of CP2)
runs with its ``documents`` tensor on one process and split over CP2 (ring and Ulysses), TP2 with sequence
parallelism, with recomputation (the documents reach the recomputed forward) and through pipeline stages.
The reference runs every document alone on one process, unpacked (``[1, length]`` token ids, no documents
tensor). For each document the packed run backpropagates the summed token losses of that document only (the
other labels are ``-100``), so its gradient must be the document's own: any attention across documents, a
position that does not restart, or a target crossing a document boundary changes it. Gradients are reduced
as the training loop does (summed over CP, SP-replicated ones over TP).

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
from trainer.errors import TrainerError
from trainer.model import ModelGroups, build_chunks, documents_tensor, model_shards, preset
from trainer.model.shards import assemble
from trainer.train import make_executor, split_batch, sync_model_parallel_grads

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


def doc_ids():
    ids = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for i, (b, start, n) in enumerate(documents()):
        ids[b, start : start + n] = i
    return ids


def run_packed(model_name, parallel, sp=False, cp_attention="ring", recompute=None):
    """The packed batch, split over ``parallel``: (summed loss, gradient pieces) per document."""
    cfg = config(model_name)
    results = []
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp, cp_attention=cp_attention)
        (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED, recompute=recompute)
        ids, docs = tokens(), documents_tensor(doc_ids())
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
    "cp4-hierarchical-2x2": ("tiny", dict(cp=4, cp_a2a=2), 4, dict(cp_attention="hierarchical")),
    "tp2-sp": ("tiny", dict(tp=2), 2, dict(sp=True)),
    "gpt2-cp2-learned-positions": ("tiny-gpt2", dict(cp=2), 2, {}),
    "cp2-ring-selective-recompute": ("tiny", dict(cp=2), 2, dict(recompute="selective")),
    "tp2-sp-full-recompute": ("tiny", dict(tp=2), 2, dict(sp=True, recompute="full")),
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


def run_pipeline(model_name, parallel, schedule):
    """The packed batch as the training loop feeds it (``[batch, 3, seq]``, one sample per micro-batch,
    :func:`split_batch`) through the pipeline executor: the step's loss and gradient pieces."""
    cfg = config(model_name)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps)
        chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=SEED)
        executor = make_executor(chunks, ps, cfg, groups, schedule=schedule, microbatches=len(LENGTHS))
        ids, labels = tokens(), torch.full((len(LENGTHS), SEQ), -100)
        for b, start, n in documents():
            labels[b, start : start + n] = doc_labels(ids[b], start, n)
        batch = torch.stack([ids, labels, doc_ids()], dim=1)
        micro = [split_batch(b, ps) for b in batch.chunk(len(LENGTHS))]
        result = executor.step([i for i, _ in micro], [lab for _, lab in micro])
        sync_model_parallel_grads(chunks, ps, sequence_parallel=False)
        for chunk in chunks:
            for p in chunk.parameters():
                p.grad /= ps.dp_cp.size
                dist.all_reduce(p.grad, group=ps.dp_cp.group)
        loss = torch.stack(result.losses).mean().item() if result.losses else None
        return loss, model_shards(chunks, grads=True)


PIPELINE_CASES = {
    "pp2-1f1b": ("tiny", dict(pp=2), "1f1b", 2),
    "pp2-cp2-zero-bubble": ("tiny", dict(pp=2, cp=2), "zero-bubble", 4),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_packed_batches_through_pipeline_stages_equal_the_documents_alone(run_ranks, case):
    """The step's mean loss over all token positions (``-100`` targets count 0), and its gradient, equal
    the documents' own summed losses and gradients divided by the number of positions."""
    name, parallel, schedule, world = PIPELINE_CASES[case]
    ((alone),) = run_ranks(1, run_alone, name)
    positions = len(LENGTHS) * SEQ
    results = run_ranks(world, run_pipeline, name, parallel, schedule)
    losses = [loss for loss, _ in results if loss is not None]  # the last stage's, one per CP rank: mean them
    assert losses and sum(losses) / len(losses) == pytest.approx(sum(loss for loss, _ in alone) / positions, rel=1e-5)
    for key in alone[0][1]:
        expected = sum(shards[key].data for _, shards in alone) / positions
        got = assemble([shards[key] for _, shards in results if key in shards])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{case} {key}: {m}")


def run_with_cache():
    cfg = config("tiny")
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=SEED)
        try:
            chunk(tokens(), chunk.kv_caches(len(LENGTHS)), documents_tensor(doc_ids()))
        except TrainerError as err:
            return str(err)
    return None


def test_the_kv_cache_path_refuses_packed_documents(run_ranks):
    (message,) = run_ranks(1, run_with_cache)
    assert message == "packed documents are for training: the KV cache path takes none"
