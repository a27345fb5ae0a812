"""Incremental decoding with a KV cache against the full-sequence forward of the same model.

The logits of every position, computed a few tokens at a time through the caches (a prefill, a chunk of
several tokens after it, then one token per call), must equal those of one forward over the whole sequence.
Tolerance: atol 1e-5 on fp32 logits of order 1 (``init_std`` 0.1 instead of 0.02, so that the logits are
far from zero and attention far from uniform); the two differ only in how the matmuls and the softmax sum
(about 2e-6 measured). A position off by one, a wrong mask or a missing key moves them by 1e-3 or more.
"""

import re

import pytest
import torch

import pstate
from trainer.errors import TrainerError
from trainer.generate import decode
from trainer.model import KVCache, ModelGroups, build_chunks, preset

SEED, BATCH, SEQ, VOCAB = 3, 3, 24, 97
SPLITS = (9, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)  # prefill 9, then 4 at once (positions 9..12), then one by one


def model(name: str, groups: ModelGroups, **changes):
    cfg = preset(name).with_overrides(vocab_size=VOCAB, init_std=0.1, **changes)
    (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
    return chunk.eval()


def cached_against_full(name: str):
    torch.manual_seed(0)
    with pstate.initialize(pstate.ParallelConfig()) as ps, torch.no_grad():
        chunk = model(name, ModelGroups.from_state(ps))
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        full = chunk(ids)  # [seq, batch, vocab]
        caches, pieces, start = chunk.kv_caches(BATCH, SEQ), [], 0
        for n in SPLITS:
            pieces.append(chunk(ids[:, start : start + n], caches))
            start += n
        assert start == SEQ and all(c.length == SEQ for c in caches)
        return full, torch.cat(pieces)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-moe", "tiny-mla"])
def test_cached_logits_equal_the_full_forward(run_ranks, name):
    ((full, cached),) = run_ranks(1, cached_against_full, name)
    assert full.abs().mean() > 0.3  # logits of order 1: the tolerance below is a tight one
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def greedy(name: str, max_seq_len: int, prompt_len: int, new: int):
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = model(name, ModelGroups.from_state(ps), max_seq_len=max_seq_len)
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
        options = dict(max_new_tokens=new, temperature=0.0, top_k=None, generator=torch.Generator())
        return [decode(chunk, prompt, use_cache=use_cache, **options) for use_cache in (True, False)]


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-mla"])
@pytest.mark.parametrize("max_seq_len", [64, 20], ids=["within", "past-max-seq-len"])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(run_ranks, name, max_seq_len):
    ((cached, uncached),) = run_ranks(1, greedy, name, max_seq_len, 7, 30)
    assert len(cached) == 30 and len(set(cached)) > 5  # not stuck on one token
    assert cached == uncached


def refused_at(name: str, parallel: dict, sp: bool):
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        chunk = model(name, ModelGroups.from_state(ps, sequence_parallel=sp))
        caches = [KVCache(1, 2, 16, 16) for _ in chunk.layers]
        try:
            chunk(torch.zeros(1, 4, dtype=torch.long), caches)
        except TrainerError as err:
            return str(err)
        return None


@pytest.mark.parametrize("parallel, sp", [(dict(tp=2), False), (dict(tp=2), True), (dict(cp=2), False)])
def test_a_cache_is_refused_with_tp_cp_or_sp(run_ranks, parallel, sp):
    for message in run_ranks(2, refused_at, "tiny", parallel, sp):
        assert message is not None and "a KV cache runs at tp=cp=1" in message


def misuse(name: str, case: str):
    with pstate.initialize(pstate.ParallelConfig()) as ps, torch.no_grad():
        chunk = model(name, ModelGroups.from_state(ps), max_seq_len=16)
        ids = torch.zeros(2, 4, dtype=torch.long)
        caches = chunk.kv_caches(2, 8)
        if case == "layers":
            caches = caches[:-1]
        elif case == "lengths":
            chunk.layers[0].attn(torch.zeros(4, 2, 64), caches[0])
        elif case in ("batch", "mla-batch"):
            ids = torch.zeros(3, 4, dtype=torch.long)
        elif case == "full":
            chunk(ids, caches)
            ids = torch.zeros(2, 5, dtype=torch.long)
        elif case == "kind":
            caches = [KVCache(2, 4, 8, 16) for _ in chunk.layers]
        elif case == "max_seq_len":
            caches = chunk.kv_caches(2, 32)
            chunk(torch.zeros(2, 14, dtype=torch.long), caches)
        try:
            chunk(ids, caches)
        except TrainerError as err:
            return str(err)
        return None


MISUSE = {
    "layers": ("tiny", "3 KV caches given for a chunk of 4 layers"),
    "lengths": ("tiny", r"must hold as many positions; they hold \[0, 4\]"),
    "batch": ("tiny", r"keys of shape \(3, 2, 4, 16\) given, the cache takes \(2, 2, 4, 16\)"),
    "full": ("tiny", "4 of 8 positions are used; 5 more do not fit"),
    "max_seq_len": ("tiny-gpt2", "sequence of 18 tokens exceeds model.max_seq_len=16"),
    "kind": ("tiny-mla", r"this model's layers take LatentCache caches \(GPTChunk.kv_caches makes them\)"),
    "mla-batch": ("tiny-mla", r"latents of shape \(3, 4, 16\) given, the cache takes \(2, 4, 16\)"),
}


@pytest.mark.parametrize("case", MISUSE)
def test_bad_use_of_a_cache_is_refused(run_ranks, case):
    name, expected = MISUSE[case]
    (message,) = run_ranks(1, misuse, name, case)
    assert message is not None
    assert re.search(expected, message), message
