"""For the inference tests and benchmark: small random models (``init_std`` 0.1, so that the greedy token moves
with the context) and checkpoints of them saved at a given TP size."""

from __future__ import annotations

import torch

import ckpt
import pstate
from trainer.config import load_run_config, to_toml
from trainer.model import ModelGroups, build_chunks, model_shards

VOCAB = 97


def run_config(name: str = "tiny", **model):
    return load_run_config(overrides={"model": {"preset": name, "init_std": 0.1, **model}, "train": {"seed": 3}})


def chunk_of(ps: pstate.ParallelState, name: str = "tiny", vocab: int = VOCAB, **model):
    cfg = run_config(name, **model)
    model_cfg = cfg.model.with_overrides(vocab_size=vocab)
    (chunk,) = build_chunks(model_cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
    return chunk.eval()


def save_checkpoint(path: str, tp: int, name: str = "tiny", **model) -> None:
    """A random model (byte tokenizer: vocab 257) saved at TP=``tp`` (run on ``tp`` ranks)."""
    cfg = run_config(name, **model)
    with pstate.initialize(pstate.ParallelConfig(tp=tp)) as ps:
        chunk = chunk_of(ps, name, 257, **model)
        ckpt.save({"model": model_shards([chunk]), "config": to_toml(cfg)}, ckpt.step_dir(path, 0))


def prompts(lengths, vocab: int = VOCAB, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
