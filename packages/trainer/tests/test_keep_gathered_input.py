"""``train.keep_gathered_input``: under TP + sequence parallelism the column-parallel layers keep their
all-gathered input for backward instead of gathering it again.

The same computation either way, so a TP=2+SP step gives bitwise-equal losses and gradients with and
without it (the weight gradients multiply the same gathered values), and a short trainer run the same
losses step by step; what changes is the number of all-gathers over TP in a step: one fewer per
column-parallel layer (qkv and fc1 of each layer, and the output layer), counted with a recorder.
"""

from dataclasses import replace

import pytest
import torch

import pstate
from pstate.comm import CommRecorder
from trainer.config import check_run, load_run_config
from trainer.errors import TrainerError
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.train import make_executor
from trainer.train.loop import train

SEED, BATCH, SEQ, VOCAB, MICRO = 7, 2, 16, 97, 2


def step(keep: bool):
    cfg = replace(preset("tiny"), vocab_size=VOCAB)
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=True, keep_gathered_input=keep)
        chunks = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
        executor = make_executor(chunks, ps, cfg, groups, schedule="1f1b", microbatches=MICRO)
        tokens = torch.randint(0, VOCAB, (MICRO, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
        with CommRecorder.for_state(ps) as rec:
            result = executor.step(list(tokens[..., :-1]), list(tokens[..., 1:]))
        gathers = sum(1 for r in rec.records if r.op == "all_gather" and r.axis == "tp")
        return result.losses, model_shards(chunks, grads=True), gathers, cfg.layers


def test_kept_inputs_give_the_same_step_with_fewer_all_gathers(run_ranks):
    for (losses, grads, gathers, layers), (losses_off, grads_off, gathers_off, _) in zip(
        run_ranks(2, step, True), run_ranks(2, step, False)
    ):
        for a, b in zip(losses, losses_off, strict=True):
            assert torch.equal(a, b)
        assert grads.keys() == grads_off.keys()
        for name, shard in grads.items():
            assert torch.equal(shard.data, grads_off[name].data), name
        assert gathers_off - gathers == MICRO * (2 * layers + 1)  # qkv, fc1 per layer, the output layer


def run_training(keep: bool) -> list[float]:
    cfg = load_run_config(
        overrides={
            "model": {"preset": "tiny"},
            "parallel": {"tp": 2},
            "train": {
                "steps": 3, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "seed": 5,
                "sequence_parallel": True, "keep_gathered_input": keep,
            },
            "optim": {"lr": 3e-3, "warmup_steps": 1, "clip_grad": 1.0},
        }
    )  # fmt: skip
    return [r["loss"] for r in train(cfg)]


def test_a_tp2_sp_run_keeping_gathered_inputs_repeats_the_default_losses(run_ranks):
    on, off = run_ranks(2, run_training, True), run_ranks(2, run_training, False)
    assert len(on[0]) == 3
    assert on == off


def groups_without_sequence_parallelism() -> str:
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
        try:
            ModelGroups.from_state(ps, keep_gathered_input=True)
        except TrainerError as error:
            return str(error)
    return "accepted"


def test_keeping_gathered_inputs_needs_sequence_parallelism(run_ranks):
    overrides = {"parallel": {"tp": 2}, "train": {"keep_gathered_input": True}}
    with pytest.raises(TrainerError, match="keep_gathered_input=true needs --sequence-parallel"):
        check_run(load_run_config(overrides=overrides), 2)
    for message in run_ranks(2, groups_without_sequence_parallelism):
        assert "keep_gathered_input=True needs sequence_parallel=True" in message
