"""A dry run: build rank ``R``'s part of an ``N``-rank job in this one process, without the other ranks.

PyTorch's ``fake`` process-group backend makes every collective return without communicating, so the
whole setup runs as it would on rank ``R``: the config checks, the layout and every process group, the
model chunks, the data-parallel engine and optimizer, the pipeline executor, and a checkpoint save
plan, planned locally from the layout (:mod:`trainer.train.replicas`, ``ckpt.plan.local_plan``).
The report gives this rank's parameter, gradient, optimizer-state and buffer bytes, the checkpoint
pieces it would write, and the wall time of each phase. The model is built at real size, so it must
fit in this machine's memory (scale the model down; the per-rank figures of a layout do not depend on
the world size beyond its parallel sizes).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

import pstate
from ckpt.agree import vector
from ckpt.plan import describe, local_plan
from ckpt.tree import flatten

from ..config import RunConfig, check_run
from ..errors import TrainerError
from .checkpoint import run_state, saveable
from .replicas import replicas
from .setup import setup


def dry_run(cfg: RunConfig, world_size: int, rank: int) -> dict[str, Any]:
    """The report of rank ``rank`` of a ``world_size``-rank run of ``cfg`` (see the module notes)."""
    if not 0 <= rank < world_size:
        raise TrainerError(f"--rank={rank} must lie in [0, --world-size={world_size})")
    if dist.is_initialized():
        raise TrainerError("a dry run starts its own (fake) process group: run it outside torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    seconds: dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        began = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - began, 4)

    with phase("config"):
        plan = check_run(cfg, world_size)
    with phase("process_group"):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        torch.manual_seed(cfg.train.seed)
        with phase("groups"):
            ps = pstate.initialize(cfg.parallel)
        with ps:
            model = cfg.model
            if model.vocab_size is None:
                from ..data import build_datasets

                vocab = build_datasets(cfg.data, seq_len=cfg.train.seq_len, seed=cfg.train.seed).tokenizer.vocab_size
                model = model.with_overrides(vocab_size=vocab)
            with phase("model_and_engine"):
                run = setup(cfg, ps, model, plan)
            with phase("checkpoint_plan"):
                figures = rank_figures(run, rank)
            return {"world_size": world_size, "rank": rank, "coords": ps.layout.coords(rank),
                    "microbatches": plan.microbatches, **figures, "seconds": seconds}  # fmt: skip
    finally:
        dist.destroy_process_group()


def rank_figures(run: Any, rank: int) -> dict[str, Any]:
    """This rank's bytes and its share of a checkpoint, planned locally from the layout (no exchange)."""
    state = saveable(run_state(run, 0, {"consumed": 0}))
    leaves = flatten(state)
    doc = describe(leaves)
    held = replicas(run.ps.layout, rank, run.model.tied_embeddings)
    holders = {name: tuple(sorted(held(name, leaf.shard()))) for name, leaf in leaves.items() if leaf.kind == "shard"}
    vector(doc, holders, rank, None, 0)
    plan = local_plan(doc, holders, rank)
    written = sum(_nbytes(_leaf_tensor(leaves[name])) for name, _ in plan.writes)
    return {
        "bytes": _memory(run),
        "checkpoint": {"leaves": len(doc["tensors"]), "pieces": len(plan.writes), "bytes": written},
    }


def _leaf_tensor(leaf: Any) -> torch.Tensor:
    return leaf.obj.value if leaf.kind == "rank_tensor" else leaf.shard().data


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _memory(run: Any) -> dict[str, int]:
    """This rank's bytes: parameters, gradients (``main_grad`` buffers or ``.grad``), optimizer state, buffers."""
    params = {id(p): p for c in run.chunks for p in c.parameters()}
    grads: dict[int, int] = {}
    for p in params.values():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            grads[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
    memory = getattr(run.optimizer, "memory_bytes", None)
    if memory is not None:  # ZeRO: the optimizer knows its shards, masters and gradient buffers
        mem = memory()
        optimizer, grad = mem["state"] + mem["master"], mem["grad"]
    else:
        tensors = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        optimizer, grad = sum(_nbytes(v) for v in tensors), sum(grads.values())
    buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for c in run.chunks for b in c.buffers()}
    return {
        "parameters": sum(_nbytes(p) for p in params.values()),
        "gradients": grad,
        "optimizer": optimizer,
        "buffers": sum(buffers.values()),
    }
