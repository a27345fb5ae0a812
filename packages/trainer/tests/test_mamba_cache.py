"""Incremental decoding of a hybrid Mamba-2 model through its caches against the full-sequence forward.

Mamba layers carry their convolution inputs and SSM state (``SSMCache``), attention layers their keys and
values, MLP layers only the position count. The logits of every position, computed a few tokens at a
time (a prefill of 9, then 4 at once, then one by one: the scan continues from the cached state inside
and across its chunks of 16), must equal one forward over the whole sequence; greedy decoding with and
without the caches must give the same tokens. Tolerance: atol 1e-5 on fp32 logits of order 1
(``init_std`` 0.1), as the KV cache test: only the order of sums differs.
"""

import torch

import pstate
from trainer.errors import TrainerError
from trainer.generate import decode
from trainer.infer import ModelRunner
from trainer.model import ModelGroups, build_chunks, preset
from trainer.model.ssm_cache import PositionCache, SSMCache

SEED, BATCH, SEQ, VOCAB = 3, 3, 24, 97
SPLITS = (9, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)


def model(groups: ModelGroups, **changes):
    cfg = preset("tiny-hybrid").with_overrides(vocab_size=VOCAB, init_std=0.1, **changes)
    (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
    return chunk.eval()


def cached_against_full():
    with pstate.initialize(pstate.ParallelConfig()) as ps, torch.no_grad():
        chunk = model(ModelGroups.from_state(ps))
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        full = chunk(ids)
        caches, pieces, start = chunk.kv_caches(BATCH, SEQ), [], 0
        kinds = [type(c).__name__ for c in caches]
        for n in SPLITS:
            pieces.append(chunk(ids[:, start : start + n], caches))
            start += n
        assert all(c.length == SEQ for c in caches)
        return full, torch.cat(pieces), kinds


def test_cached_logits_equal_the_full_forward(run_ranks):
    ((full, cached, kinds),) = run_ranks(1, cached_against_full)
    assert kinds == [SSMCache.__name__, "KVCache", SSMCache.__name__, PositionCache.__name__]
    assert full.abs().mean() > 0.3
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def greedy():
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = model(ModelGroups.from_state(ps), max_seq_len=64)
        prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(2)).tolist()
        options = dict(max_new_tokens=30, temperature=0.0, top_k=None, generator=torch.Generator())
        return [decode(chunk, prompt, use_cache=use_cache, **options) for use_cache in (True, False)]


def test_greedy_tokens_are_the_same_with_and_without_the_caches(run_ranks):
    ((with_cache, without),) = run_ranks(1, greedy)
    assert len(with_cache) == 30 and len(set(with_cache)) > 5  # not stuck on one token
    assert with_cache == without


def served():
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        try:
            ModelRunner(model(ModelGroups.from_state(ps)), num_blocks=4, block_size=4)
        except TrainerError as error:
            return str(error)
        return None


def test_the_paged_engine_refuses_a_hybrid_model_by_name(run_ranks):
    (message,) = run_ranks(1, served)
    assert message == (
        "model.layer_pattern='M*M-': the paged engine serves attention-only models; "
        "use trainer generate for hybrid Mamba models"
    )
