"""``trainer generate`` from a checkpoint saved at another layout (TP2 with SP), in one process."""

import pytest

from trainer.cli import build_parser
from trainer.config import load_run_config
from trainer.errors import TrainerError
from trainer.generate import generate
from trainer.train.loop import train


def train_and_save(save: str, cache: str) -> None:
    overrides = {
        "parallel": {"tp": 2},
        "train": {
            "steps": 6,
            "seq_len": 32,
            "micro_batch": 2,
            "global_batch": 4,
            "save": save,
            "sequence_parallel": True,
        },
        "data": {"cache_dir": cache},
    }
    train(load_run_config(overrides=overrides))


def sample(save: str, seed: int, temperature: float, use_cache: bool = True) -> str:
    return generate(save, "def ", max_new_tokens=12, temperature=temperature, seed=seed, use_cache=use_cache)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, rank_harness):
    root = tmp_path_factory.mktemp("generate")
    rank_harness.run(2, train_and_save, str(root / "ckpt"), str(root / "cache"))
    return str(root / "ckpt")


def test_samples_are_a_function_of_the_seed(run_ranks, checkpoint):
    first, again, other = (run_ranks(1, sample, checkpoint, seed, 1.0)[0] for seed in (1, 1, 2))
    assert first.startswith("def ") and len(first) <= len("def ") + 12  # a byte decodes to at most one character
    assert first == again and first != other


def test_greedy_decoding_is_deterministic(run_ranks, checkpoint):
    assert run_ranks(1, sample, checkpoint, 1, 0.0) == run_ranks(1, sample, checkpoint, 2, 0.0)


def test_the_kv_cache_changes_no_token(run_ranks, checkpoint):
    # sampled, not greedy: six training steps leave an argmax that repeats one token whatever the context
    # (greedy decoding against the cache is tested in test_kv_cache.py, on models whose argmax moves)
    with_cache = run_ranks(1, sample, checkpoint, 3, 1.0)
    assert with_cache == run_ranks(1, sample, checkpoint, 3, 1.0, use_cache=False)


def test_no_cache_flag():
    args = ["generate", "--load", "ckpts", "--prompt", "def "]
    assert build_parser().parse_args(args).use_cache
    assert not build_parser().parse_args([*args, "--no-cache"]).use_cache


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(TrainerError, match="no complete checkpoint"):
        generate(tmp_path, "x")
