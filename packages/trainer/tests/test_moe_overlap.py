"""``train.moe_overlap``: the GPT model's MoE all-to-alls hidden behind another micro-batch's compute.

The ``tiny-moe`` model (layers 1 and 3 are MoE layers) runs one step of ``MICRO`` micro-batches through
``make_executor(..., overlap=True)`` (the paired 1F1B: each steady-state forward interleaved with the
previous micro-batch's backward, chunks cut at their all-to-alls) and through the plain executor, at
EP=2 (pp=1, the pairs F(k+1)/B(k) of one rank), EP=2 x TP=2 with sequence parallelism, and PP=2 x EP=2.
Losses must be equal bitwise (the forward runs the same operations) and every gradient within rtol
1e-5, atol 1e-6 (as test_pipeline_parity): the cut backward adds the gradient contributions of a tensor
used twice (the residual and the norm) in another order.
"""

from dataclasses import replace

import pytest
import torch

import pstate
from trainer.config import check_run, load_run_config
from trainer.errors import TrainerError
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.train import make_executor

SEED, BATCH, SEQ, VOCAB, MICRO = 7, 4, 16, 97, 3


def run(parallel, sp, overlap):
    cfg = replace(preset("tiny-moe"), vocab_size=VOCAB)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp)
        chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=SEED)
        cut = []  # the micro-batches run cut into pieces (each forward asks for one staged run)
        for chunk in chunks:
            chunk.staged_run = lambda chunk=chunk: cut.append(1) or type(chunk).staged_run(chunk)
        executor = make_executor(chunks, ps, cfg, groups, schedule="1f1b", microbatches=MICRO, overlap=overlap)
        g = torch.Generator().manual_seed(11 + ps.dp.rank)  # each data-parallel rank its own tokens
        tokens = torch.randint(0, VOCAB, (MICRO, BATCH, SEQ + 1), generator=g)
        result = executor.step(list(tokens[..., :-1]), list(tokens[..., 1:]))
        return result.losses, model_shards(chunks, grads=True), len(cut)


CASES = {"ep2": ({"ep": 2}, False), "ep2-tp2-sp": ({"ep": 2, "tp": 2}, True), "pp2-ep2": ({"ep": 2, "pp": 2}, False)}


@pytest.mark.parametrize(("parallel", "sp"), list(CASES.values()), ids=list(CASES))
def test_moe_overlap_gives_the_losses_and_gradients_of_the_plain_pipeline(run_ranks, parallel, sp):
    world = parallel.get("tp", 1) * parallel.get("pp", 1) * parallel["ep"]
    on = run_ranks(world, run, parallel, sp, True)
    off = run_ranks(world, run, parallel, sp, False)
    for (losses, grads, cut), (losses_off, grads_off, cut_off) in zip(on, off):
        assert (cut, cut_off) == (MICRO, 0)
        assert len(losses) == len(losses_off)
        for a, b in zip(losses, losses_off):
            assert torch.equal(a, b)
        assert grads.keys() == grads_off.keys()
        for name, shard in grads.items():
            assert shard.offsets == grads_off[name].offsets
            torch.testing.assert_close(shard.data, grads_off[name].data, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        ({"model": {"preset": "tiny-moe"}}, 1, "needs parallel.ep > 1, got ep=1"),
        (
            {"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2, "pp": 2}, "train": {"pipeline_schedule": "gpipe"}},
            4,
            "needs a schedule with overlapped pairs",
        ),
        ({"model": {"preset": "tiny-moe", "moe_dispatcher": "allgather"}, "parallel": {"ep": 2}}, 2, "alltoall"),
        ({"model": {"preset": "tiny-moe", "dropout": 0.1}, "parallel": {"ep": 2}}, 2, "needs model.dropout=0"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2}, "train": {"precision": "bf16"}}, 2, "bf16"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2}, "train": {"recompute": "full"}}, 2, "'full'"),
    ],
)
def test_moe_overlap_refuses_what_it_cannot_run(overrides, world, match):
    overrides.setdefault("train", {})["moe_overlap"] = True
    with pytest.raises(TrainerError, match=match):
        check_run(load_run_config(overrides=overrides), world)


def test_moe_overlap_is_accepted_with_its_schedules():
    for parallel, schedule, world in (({"ep": 2}, "1f1b", 2), ({"ep": 2, "pp": 2, "vpp": 2}, "dualpipe-v", 4)):
        overrides = {
            "model": {"preset": "tiny-moe"},
            "parallel": parallel,
            "train": {"moe_overlap": True, "pipeline_schedule": schedule, "global_batch": 16},
        }
        assert check_run(load_run_config(overrides=overrides), world).microbatches >= 1
