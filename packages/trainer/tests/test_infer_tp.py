"""Tensor-parallel generation: a checkpoint saved at TP=1 or TP=2 generates at TP=2 exactly the tokens it
generates at TP=1 (greedy and seeded sampling, mixed prompt lengths, a pool small enough to preempt); the same
for multi-latent attention, whose paged cache holds the whole latent on every TP rank."""

import pytest

from trainer.infer import Request, SamplingParams, engine_for, inference_state, load_chunk
from trainer.infer.testing import prompts, save_checkpoint

PARAMS = [
    SamplingParams(max_tokens=10, temperature=0),
    SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=4),
    SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=5),
]


def generate_at(path: str, tp: int):
    with inference_state(tp) as ps:
        chunk, _, tokenizer = load_chunk(path, ps)
        runner, engine = engine_for(chunk, tokenizer, block_size=4, num_blocks=18, max_batch_tokens=16)
        if engine is None:
            runner.follow()
            return None
        try:
            ids = prompts((7, 31, 2, 18, 44), vocab=257)
            done = engine.generate([Request(p, PARAMS[i % 3]) for i, p in enumerate(ids)])
        finally:
            engine.close()
        return [c.token_ids for c in done], engine.stats()["preemptions"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, rank_harness):
    root = tmp_path_factory.mktemp("infer-tp")
    for tp in (1, 2):
        rank_harness.run(tp, save_checkpoint, str(root / f"tp{tp}"), tp)
    return {tp: str(root / f"tp{tp}") for tp in (1, 2)}


@pytest.mark.parametrize("saved", [1, 2], ids=["saved-tp1", "saved-tp2"])
def test_tp2_generates_what_tp1_does(run_ranks, checkpoints, saved):
    ((one, preempted),) = run_ranks(1, generate_at, checkpoints[saved], 1)
    (two, _), follower = run_ranks(2, generate_at, checkpoints[saved], 2)
    assert follower is None
    assert two == one
    assert preempted > 0 and len({tuple(t) for t in one}) == len(one)


def test_mla_tp2_generates_what_tp1_does(run_ranks, tmp_path):
    path = str(tmp_path / "mla")
    run_ranks(1, save_checkpoint, path, 1, "tiny-mla")
    ((one, preempted),) = run_ranks(1, generate_at, path, 1)
    (two, _), follower = run_ranks(2, generate_at, path, 2)
    assert follower is None
    assert two == one
    assert preempted > 0 and len({tuple(t) for t in one}) == len(one)
