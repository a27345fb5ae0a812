"""A checkpoint (saved at any layout) loaded into the inference layout: TP = the world, PP = CP = 1.

Every rank of the group builds its TP shard of the model and loads its part of the layout-free tensors
(``trainer.model.model_shards``), as a training run resumed at another layout does. The first rank
drives an :class:`Engine`; the others follow its steps (:meth:`ModelRunner.follow`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

import ckpt
import pstate

from ..config import RunConfig, parse_run_config
from ..data import load_tokenizer
from ..errors import TrainerError
from ..model import GPTChunk, ModelGroups, build_chunks, weights_state
from .engine import Engine
from .runner import ModelRunner


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint, else the newest complete one under it."""
    found = Path(path) if (Path(path) / "index.json").exists() else ckpt.latest(path)
    if found is None:
        raise TrainerError(f"--load {path}: no complete checkpoint there")
    return found


def load_chunk(path: str | Path, ps: pstate.ParallelState) -> tuple[GPTChunk, RunConfig, Any]:
    """The whole model at the TP size of ``ps`` with the checkpoint's weights, its run config and tokenizer."""
    found = find_checkpoint(path)
    cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"], source=f"{found} config")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = cfg.model
    if model.vocab_size is None:
        model = model.with_overrides(vocab_size=tokenizer.vocab_size)
    groups = ModelGroups.from_state(ps)
    if model.num_experts and groups.tp_size > 1:
        raise TrainerError("--tp: a mixture-of-experts model is served at tp=1 (its layers need SP at tp > 1)")
    if model.num_kv_heads % groups.tp_size:
        raise TrainerError(f"--tp {groups.tp_size}: must divide the model's key/value heads ({model.num_kv_heads})")
    (chunk,) = build_chunks(model, groups, pp_rank=0, pp=1, seed=cfg.train.seed)
    ckpt.load(weights_state([chunk]), found)
    return chunk.eval(), cfg, tokenizer


def inference_state(tp: int) -> pstate.ParallelState:
    """The parallel state of inference at ``tp`` over the whole default group (a context manager)."""
    world = dist.get_world_size()
    if world != tp:
        raise TrainerError(f"--tp {tp}: inference runs on exactly tp ranks; there are {world}")
    return pstate.initialize(pstate.ParallelConfig(tp=tp))


def default_blocks(chunk: GPTChunk, block_size: int, sequences: int = 8) -> int:
    """A pool that holds ``sequences`` sequences of the full context."""
    return sequences * -(-chunk.cfg.max_seq_len // block_size)


def engine_for(
    chunk: GPTChunk,
    tokenizer: Any,
    *,
    block_size: int = 16,
    num_blocks: int | None = None,
    max_batch_tokens: int = 256,
    max_seqs: int = 32,
    policy: str = "continuous",
) -> tuple[ModelRunner, Engine | None]:
    """The runner of ``chunk`` and, on the driver rank, the engine over it (``None`` on followers)."""
    runner = ModelRunner(chunk, num_blocks=num_blocks or default_blocks(chunk, block_size), block_size=block_size)
    if not runner.is_driver:
        return runner, None
    engine = Engine(
        runner, tokenizer=tokenizer, eos_id=getattr(tokenizer, "eos_id", None),
        max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, policy=policy,
    )  # fmt: skip
    return runner, engine
