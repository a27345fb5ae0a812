"""``trainer plan``: exact parameter counts, and layouts that obey every rule and fit the memory."""

import subprocess
import sys

import pytest

import pstate
from trainer.config import RunConfig, TrainConfig, check_run
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.plan import Cluster, parameter_count, plan


def counted(name: str) -> int:
    cfg = preset(name).with_overrides(vocab_size=257)
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        return sum(s.data.numel() for s in model_shards([chunk]).values())


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-moe"])
def test_parameter_count_is_the_model_s(run_ranks, name):
    assert sum(parameter_count(preset(name).with_overrides(vocab_size=257))) == run_ranks(1, counted, name)[0]


def test_parameter_counts_of_known_models():
    assert sum(parameter_count(preset("gpt2"))) == 124_439_808  # Hugging Face's gpt2
    assert sum(parameter_count(preset("llama3-8b"))) == 8_030_261_248  # Meta-Llama-3-8B


def test_plans_obey_the_rules_and_fit():
    cluster = Cluster(gpus=16, memory_gib=40)
    plans = plan(preset("llama3-8b"), cluster, seq_len=4096, global_batch=64, top=20)
    steps = [round(p.step_s, 2) for p in plans]  # within 10 ms the simpler layout comes first
    assert plans and steps == sorted(steps)
    for p in plans:
        assert p.memory_gib <= 0.9 * cluster.memory_gib
        train = TrainConfig(seq_len=4096, micro_batch=p.micro_batch, global_batch=64, zero=p.zero,
                            recompute=p.recompute, sequence_parallel=p.sequence_parallel)  # fmt: skip
        check_run(RunConfig(model=preset("llama3-8b"), parallel=p.parallel, train=train), cluster.gpus)


def test_more_memory_never_makes_a_plan_slower():
    small = plan(preset("llama3-8b"), Cluster(gpus=8, memory_gib=24), seq_len=4096, global_batch=32)
    large = plan(preset("llama3-8b"), Cluster(gpus=8, memory_gib=80), seq_len=4096, global_batch=32)
    assert large[0].step_s <= small[0].step_s


def test_nothing_fits_is_said(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "plan", "--model", "llama3-8b", "--gpus", "1", "--gpu-memory", "8",
         "--seq-len", "4096", "--global-batch", "8"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1 and "no layout fits" in done.stdout


def test_plan_command_prints_the_best_as_a_train_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "plan", "--model", "gpt2", "--gpus", "8", "--seq-len", "1024",
         "--global-batch", "64", "--top", "3"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "best: trainer train --model gpt2 --seq-len 1024 --global-batch 64" in done.stdout
