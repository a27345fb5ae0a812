"""A dry run: build rank ``R``'s part of an ``N``-rank job in this one process, without the other ranks.

PyTorch's ``fake`` process-group backend stands in for the other ranks, so the whole setup runs as it
would on rank ``R``: the config checks, the layout and this rank's process groups (only the groups that
hold it: ``pstate.initialize`` creates no others under the fake backend), the model chunks, the
data-parallel engine and optimizer, the pipeline executor, and a checkpoint save plan, planned locally
from the layout (:mod:`trainer.train.replicas`, ``ckpt.plan.local_plan``).

The model is built at real size when it fits (``device="auto"``: the rank's parameters, gradients and
Adam state estimated at most ``real_limit`` bytes) and on the meta device otherwise: every tensor has its
shape and dtype and no storage, so any rank of a 70B-class layout builds here, and the byte figures,
which come from shapes and dtypes, are the same either way.

At real size one training step runs under :func:`pstate.comm.simulate` (collectives fill their outputs
from this rank's inputs instead of communicating; pipeline receives are zeros of the announced shapes)
and a :class:`pstate.comm.CommRecorder`: the report gives the collectives the step issues per axis with
their bytes, and the optimizer state the step creates. A meta model cannot run a step (a loss is read on
the host, MoE routing sizes its exchanges from the tokens), so there the step is skipped and the
optimizer state is created as the first step would create it (Adam's step and two moments, from shapes).

The report: this rank's coordinates, parameter / gradient / optimizer / buffer bytes, the step's
collectives per axis (``comm``, with ``source``), the checkpoint pieces it would write, and the wall
time, process CPU time and resident-memory growth of each phase.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import pstate
from ckpt.agree import vector
from ckpt.plan import describe, local_plan
from ckpt.tree import flatten
from dp_shard import FSDPEngine
from pp_sched.p2p import TensorSpec
from pstate import comm

from ..config import RunConfig, RunPlan, check_run
from ..errors import TrainerError
from .checkpoint import run_state, saveable
from .loop import train_step
from .replicas import replicas
from .setup import Run, setup

DEVICES = ("auto", "real", "meta")
REAL_LIMIT = 2 * 2**30
"""``device="auto"`` builds at real size up to this many estimated bytes per rank (parameters, gradients
and Adam's two moments, fp32), on the meta device above."""


def dry_run(
    cfg: RunConfig,
    world_size: int,
    rank: int,
    *,
    device: str = "auto",
    step: bool = True,
    real_limit: int = REAL_LIMIT,
) -> dict[str, Any]:
    """The report of rank ``rank`` of a ``world_size``-rank run of ``cfg`` (see the module notes).
    ``device``: ``"real"``, ``"meta"`` or ``"auto"``; ``step``: run one simulated step (real size only)."""
    if not 0 <= rank < world_size:
        raise TrainerError(f"--rank={rank} must lie in [0, --world-size={world_size})")
    if device not in DEVICES:
        raise TrainerError(f"--dry-run-device={device!r} must be one of {', '.join(DEVICES)}")
    if dist.is_initialized():
        raise TrainerError("a dry run starts its own (fake) process group: run it outside torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    grown: dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        began, used, held = time.perf_counter(), time.process_time(), resident_bytes()
        yield
        seconds[name] = round(time.perf_counter() - began, 4)
        cpu[name] = round(time.process_time() - used, 4)
        grown[name] = round((resident_bytes() - held) / 2**20, 2)

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
            meta = device == "meta" or (device == "auto" and estimated_bytes(cfg, model) > real_limit)
            with phase("model_and_engine"), torch.device("meta") if meta else nullcontext():
                run = setup(cfg, ps, model, plan, device=torch.device("meta") if meta else None)
            report: dict[str, Any] = {
                "world_size": world_size, "rank": rank, "coords": ps.layout.coords(rank),
                "microbatches": plan.microbatches, "device": "meta" if meta else "real",
            }  # fmt: skip
            if step and not meta:
                with phase("step"):
                    report["comm"] = simulated_step(run)
            elif step:
                report["comm"] = analytic_traffic(cfg, model, plan)
            if meta:
                first_step_state(run)
            with phase("checkpoint_plan"):  # a meta model's dropout RNG states: the CPU's, as at real size
                report.update(rank_figures(dataclasses.replace(run, device=torch.device("cpu")) if meta else run, rank))
            return {**report, "seconds": seconds, "cpu_seconds": cpu, "resident_mib": grown}
    finally:
        dist.destroy_process_group()


def first_step_state(run: Run) -> None:
    """What a first step creates, from shapes: the optimizer's state (Adam: step, two moments) and, under
    ZeRO-3, each shard's ``.grad`` (the other engines keep gradients in buffers made at setup)."""
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # ZeRO-1/2: the wrapped one
    for group in optimizer.param_groups:  # AdamW's first step: step 0 and two moments like each parameter
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))  # fmt: skip
    if isinstance(run.engine, FSDPEngine):
        for chunk in run.chunks:
            for p in chunk.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def estimated_bytes(cfg: RunConfig, model: Any) -> float:
    """A rough upper bound of one rank's fp32 parameters, gradients and Adam moments (16 bytes per
    parameter), from the model's counts and the layout's model-parallel sizes."""
    from ..plan.models import parameter_count

    p = cfg.parallel
    dense, expert = parameter_count(model)
    per_rank = dense / (p.tp * p.pp) + expert / ((p.etp or p.tp) * p.ep * p.pp)
    return 16.0 * per_rank


def analytic_traffic(cfg: RunConfig, model: Any, plan: RunPlan) -> dict[str, Any]:
    """For a meta model, which runs no step: the bytes per axis one GPU sends per step by ``trainer plan``'s
    traffic model (ring volumes; calibrated against recorded bytes), not a simulation."""
    from ..plan import Layout, Workload, estimate, load_hardware

    work = Workload(model, plan.seq_len, plan.global_batch, plan.precision, plan.cp_attention)
    traffic = estimate(work, Layout.from_run_config(cfg, plan.world_size), load_hardware("h100-sxm")).time.traffic
    return {
        "source": "analytic: trainer.plan's traffic model (a meta model runs no step; build at real size to "
        "simulate one)",
        "wire_bytes": {axis: int(v) for axis, v in sorted(traffic.items())},
    }


def made_up_batches(run: Run) -> list[np.ndarray]:
    """This rank's micro-batches of one step: token ids drawn from the run's seed (a real run given them
    issues the collectives a simulated step does)."""
    t, rng = run.cfg.train, np.random.default_rng(run.cfg.train.seed)
    return [rng.integers(0, run.model.vocab_size, (t.micro_batch, t.seq_len + 1)) for _ in range(run.microbatches)]


def simulated_step(run: Run) -> dict[str, Any]:
    """One training step on :func:`made_up_batches` under simulated communication (see the module notes):
    this rank's collectives per axis (see :func:`comm_axes`)."""
    t, ps = run.cfg.train, run.ps
    tokens = t.seq_len // ps.cp.size // (ps.tp.size if t.sequence_parallel else 1)
    dtype = next(p.dtype for c in run.chunks for p in c.parameters())
    run.executor.p2p.simulated_specs = (TensorSpec((tokens, t.micro_batch, run.model.hidden), dtype),)
    recorder = comm.CommRecorder.for_state(ps)
    with comm.simulate(), recorder:
        train_step(run, made_up_batches(run))
    return {"source": "simulated step (real-size model)", "axes": comm_axes(recorder)}


def comm_axes(recorder: comm.CommRecorder) -> dict[str, dict[str, Any]]:
    """Per axis: payload ``bytes``, ``wire_bytes`` (what a ring moves per rank), ``calls``, and the payload
    bytes of each operation (``ops``)."""
    return {
        axis: {"bytes": int(v["bytes"]), "wire_bytes": int(v["wire_bytes"]), "calls": int(v["calls"]),
               "ops": {op: int(o["bytes"]) for op, o in sorted(recorder.by_op(axis).items())}}
        for axis, v in sorted(recorder.by_axis().items())
    }  # fmt: skip


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
            grads[g.untyped_storage()._cdata] = g.untyped_storage().nbytes()
    memory = getattr(run.optimizer, "memory_bytes", None)
    if memory is not None:  # ZeRO: the optimizer knows its shards, masters and gradient buffers
        mem = memory()
        optimizer, grad = mem["state"] + mem["master"], mem["grad"]
    else:
        tensors = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        optimizer, grad = sum(_nbytes(v) for v in tensors), sum(grads.values())
    buffers = {b.untyped_storage()._cdata: b.untyped_storage().nbytes() for c in run.chunks for b in c.buffers()}
    return {
        "parameters": sum(_nbytes(p) for p in params.values()),
        "gradients": grad,
        "optimizer": optimizer,
        "buffers": sum(buffers.values()),
    }
