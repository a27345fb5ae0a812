"""The inference engine against generation one request at a time and against the full forward.

* Paged attention: the logits after each step of two packed sequences, fed in chunks (a prefill of 9, a
  chunk of 4, then one token per step), equal those of one full forward over each whole sequence (atol
  1e-5 on fp32 logits of order 1, as the KV-cache test: only the summation order differs).
* Batching: a batch of prompts of different lengths returns, for each, exactly the tokens it gets alone,
  greedy (also against ``trainer.generate.decode``, the KVCache path, and its no-cache recompute) and
  sampled with its own seed (top-k, top-p, repetition penalty); a static batch, and a continuous one with
  requests arriving while others decode and a pool so small that the youngest are preempted and recomputed.
"""

import asyncio

import pytest
import torch

import pstate
from trainer.data import load_tokenizer
from trainer.errors import TrainerError
from trainer.generate import decode
from trainer.infer import Engine, ModelRunner, Request, SamplingParams, Segment
from trainer.infer.testing import VOCAB, chunk_of, prompts

LENGTHS = (3, 17, 40, 9, 1, 25)
GREEDY = SamplingParams(max_tokens=12, temperature=0)
SAMPLED = [
    SamplingParams(max_tokens=12, temperature=0.9, top_k=10, seed=1),
    SamplingParams(max_tokens=12, temperature=1.2, top_p=0.8, seed=2),
    SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=3),
    SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5),
]


def engine(chunk, *, num_blocks=64, block_size=4, **options) -> Engine:
    return Engine(ModelRunner(chunk, num_blocks=num_blocks, block_size=block_size), **options)


def paged_logits(name: str):
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = chunk_of(ps, name)
        a, b = prompts((24, 19))
        with torch.no_grad():
            full = [chunk(torch.tensor([ids]))[:, 0, :VOCAB] for ids in (a, b)]
        runner = ModelRunner(chunk, num_blocks=16, block_size=4)
        tables = [[], []]
        splits = (9, 4, *([1] * 11))
        got, expected, start = [], [], 0
        for n in splits:
            segments = []
            for seq, table in zip((a, b), tables):
                end = min(start + n, len(seq))
                if end > start:
                    assert runner.pool.grow(table, end)
                    segments.append(Segment(seq[start:end], start, table))
                    expected.append(full[(a, b).index(seq)][end - 1])
            got.append(runner.run(segments, [True] * len(segments)))
            start += n
        return torch.stack(expected), torch.cat(got)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-mla"])
def test_paged_logits_equal_the_full_forward(run_ranks, name):
    ((expected, got),) = run_ranks(1, paged_logits, name)
    assert expected.abs().mean() > 0.3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def batched_against_solo(name: str):
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = chunk_of(ps, name)
        ids = prompts(LENGTHS)
        reference = [decode(chunk, p, max_new_tokens=12, temperature=0, top_k=None, generator=None) for p in ids]
        recompute = [
            decode(chunk, p, max_new_tokens=12, temperature=0, top_k=None, generator=None, use_cache=False) for p in ids
        ]
        params = [GREEDY] * len(ids) + [SAMPLED[i % len(SAMPLED)] for i in range(len(ids))]
        requests = [Request(p, q) for p, q in zip(ids + ids, params)]
        solo = [engine(chunk).generate([r])[0].token_ids for r in requests]
        static = engine(chunk, policy="static").generate(requests)
        small = engine(chunk, num_blocks=16, max_batch_tokens=16)
        continuous = small.generate(requests)
        static, continuous = [c.token_ids for c in static], [c.token_ids for c in continuous]
        return reference, recompute, solo, static, continuous, small.stats()


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-mla"])
def test_a_batch_of_mixed_lengths_equals_each_prompt_alone(run_ranks, name):
    ((reference, recompute, solo, static, continuous, small),) = run_ranks(1, batched_against_solo, name)
    n = len(LENGTHS)
    assert solo[:n] == reference == recompute
    assert len({tuple(t) for t in reference}) > 1 and all(len(t) == 12 for t in solo)
    assert static == solo
    assert continuous == solo
    assert small["preemptions"] > 0  # 16 blocks of 4 positions: 12 requests of up to 52 do not fit
    assert small["free_blocks"] == 16


def arrivals(name: str):
    """Requests arrive every few steps while others decode; a pool of 14 blocks forces preemption."""
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = chunk_of(ps, name)
        ids = prompts((30, 5, 22, 11, 2, 35, 8))
        params = [GREEDY, SAMPLED[0], GREEDY, SAMPLED[2], GREEDY, SAMPLED[1], GREEDY]
        solo = [engine(chunk).generate([Request(p, q)])[0].token_ids for p, q in zip(ids, params)]
        live = engine(chunk, num_blocks=14, max_batch_tokens=12)
        seqs, step = [], 0
        while len(seqs) < len(ids) or live.scheduler.has_work():
            if len(seqs) < len(ids) and step % 3 == 0:
                seqs.append(live.sequence(Request(ids[len(seqs)], params[len(seqs)])))
                live.scheduler.add(seqs[-1])
            live.step()
            step += 1
        return solo, [s.output for s in seqs], live.scheduler.preemptions, live.runner.pool.free


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_continuous_batching_under_arrivals_and_preemption_equals_solo(run_ranks, name):
    ((solo, continuous, preemptions, free),) = run_ranks(1, arrivals, name)
    assert continuous == solo
    assert preemptions > 0 and free == 14


def stops():
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = chunk_of(ps, "tiny", vocab=257)
        tokenizer = load_tokenizer("byte")
        eng = engine(chunk, tokenizer=tokenizer, eos_id=tokenizer.eos_id)
        prompt = "hello"
        free = eng.generate([Request(prompt, SamplingParams(max_tokens=24, temperature=0))])[0]
        # a stop string from the middle of the free text: the text ends before its first occurrence
        stop = tokenizer.decode(free.token_ids[6:8])
        stopped = eng.generate([Request(prompt, SamplingParams(max_tokens=24, temperature=0, stop=("\x00zz", stop)))])
        # the end-of-text token: the model's 7th greedy token made the EOS id
        eos = Engine(eng.runner, tokenizer=tokenizer, eos_id=free.token_ids[6])
        ended = eos.generate([Request(prompt, SamplingParams(max_tokens=24, temperature=0))])[0]
        ignored = eos.generate([Request(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))])[0]
        return free, stop, stopped[0], ended, ignored


def test_stops(run_ranks):
    ((free, stop, stopped, ended, ignored),) = run_ranks(1, stops)
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids and len(stopped.token_ids) < 24
    first = free.token_ids.index(free.token_ids[6])
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:first]
    assert ignored.token_ids == free.token_ids


def streamed():
    """``submit``: concurrent streams equal ``generate``; their text pieces add up to the final text."""
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk = chunk_of(ps, "tiny", vocab=257)
        tokenizer = load_tokenizer("byte")
        eng = engine(chunk, num_blocks=24, tokenizer=tokenizer, eos_id=tokenizer.eos_id)
        requests = [
            Request(text, SamplingParams(max_tokens=16, temperature=t, seed=7, stop=("e",)))
            for text in ("hello", "a longer prompt here", "x") for t in (0, 1.0)
        ]  # fmt: skip
        expected = eng.generate(requests)

        async def one(request):
            pieces, last = [], None
            async for out in eng.submit(request):
                pieces.append(out.text)
                last = out
            return "".join(pieces), last.finish_reason

        async def abandon():
            stream = eng.submit(Request("abandoned", SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)))
            await anext(stream)
            await stream.aclose()  # the client went away

        async def main():
            results = await asyncio.gather(*(one(r) for r in requests), abandon())
            return results[:-1]

        eng.start()
        try:
            got = asyncio.run(main())
            # the abandoned request's blocks come back (waited for through the engine's own loop)
            asyncio.run(one(Request("sync", SamplingParams(max_tokens=1))))
            stats = eng.stats()
        finally:
            eng.close()
        return [(c.text, c.finish_reason) for c in expected], got, stats


def test_submit_streams_what_generate_returns(run_ranks):
    ((expected, got, stats),) = run_ranks(1, streamed)
    assert got == expected
    assert stats["free_blocks"] == stats["total_blocks"] and stats["running"] == 0


def test_sampling_params_name_the_field():
    for field, value in [("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_k", 0), ("seed", -1)]:
        with pytest.raises(TrainerError, match=f"^{field}: "):
            SamplingParams(**{field: value})
    with pytest.raises(TrainerError, match=r"^stop: "):
        SamplingParams(stop=("",))


def bad_requests():
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        eng = engine(chunk_of(ps, "tiny"), num_blocks=8)
        errors = []
        for prompt, params in [
            ([], GREEDY), ([1] * 256, GREEDY), ([1] * 250, SamplingParams(max_tokens=10)), ([VOCAB], GREEDY),
            ([1] * 30, SamplingParams(max_tokens=10)), ("text", GREEDY),
        ]:  # fmt: skip
            try:
                eng.sequence(Request(prompt, params))
            except TrainerError as err:
                errors.append(str(err).split(":")[0])
        return errors


def test_bad_requests_are_refused_by_field(run_ranks):
    # empty, longer than the context, prompt + max_tokens past it, an id outside the vocabulary, more than the
    # pool (8 blocks of 4), text without a tokenizer
    assert run_ranks(1, bad_requests) == [["prompt", "prompt", "max_tokens", "prompt", "max_tokens", "prompt"]]
