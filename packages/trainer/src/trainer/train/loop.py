"""``train(cfg)``: the training loop on every rank of a run (started by torchrun or ``--nproc``).

Each step (:func:`train_step`): the learning rate of the step, this rank's micro-batches (the same global
samples at any DP size), forwards and backwards through the pipeline executor (accumulating without
communication until each chunk's last backward), the data-parallel reduction (once per step), the
model-parallel gradient completion, then the engine's step protocol (unscale with an overflow check,
clipping by the global norm, the optimizer step: skipped, or the run stopped, on a non-finite loss or
norm), the MoE routers' expert-bias update, then metrics, evaluation and checkpoints as configured.
Resumes from the newest complete checkpoint under ``--load`` (or ``--save``); SIGTERM and SIGINT
finish the current step, save, and return.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

import ckpt
import pstate
from dp_shard import ClipGroups
from pstate import comm
from pstate.comm import CommRecorder

from ..config import RunConfig, check_run
from ..config.inputs import model_vocab
from ..data import DataIterator, build_datasets
from ..errors import TrainerError
from .checkpoint import load_run, save_run
from .flops import flops_per_token
from .lr import lr_at
from .metrics import Metrics
from .peak import device_peak
from .pipeline import scale_router_losses, split_batch, sync_sequence_parallel_grads, sync_tied_embedding_grads
from .report import banner, memory_mb
from .resume import checkpoints_to_try
from .setup import Run, loss_weight, setup
from .signals import stop_on_signal
from .skips import SkipCounter
from .watchdog import collective_timeout, watch


def train(cfg: RunConfig, *, stream: TextIO = sys.stderr) -> list[dict[str, Any]]:
    """Train as ``cfg`` says; return the per-step records (on every rank; the loss is global)."""
    if not dist.is_initialized():
        raise TrainerError("train() runs inside a process group: start it with torchrun or trainer train --nproc")
    plan = check_run(cfg, dist.get_world_size())
    t = cfg.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)
    with pstate.initialize(cfg.parallel, timeout=collective_timeout(t)) as ps:
        # whichever rank builds the default corpus cache (the others wait on its lock) says so
        say = functools.partial(print, file=stream, flush=True)
        datasets = build_datasets(cfg.data, seq_len=t.seq_len, seed=t.seed, log=say)
        model = model_vocab(cfg.model, datasets.tokenizer, list(datasets.sources))
        run = setup(cfg, ps, model, plan)
        data = _data_iterator(run, datasets.train)
        metrics = Metrics(
            active=dist.get_rank() == 0, metrics_file=t.metrics_file, tensorboard=t.tensorboard, stream=stream
        )
        if metrics.active:
            metrics.banner(banner(run, datasets))
        try:
            recorder = CommRecorder.for_state(ps) if t.comm_report else None
            return _loop(run, data, datasets, metrics, recorder)
        finally:
            metrics.close()


def _data_iterator(run: Run, dataset: Any) -> DataIterator:
    """This rank's micro-batches of ``dataset``, global batch by global batch, as the plan says."""
    plan, ps = run.plan, run.ps
    return DataIterator(
        dataset, global_batch=plan.global_batch, micro_batch=plan.micro_batch, dp_size=ps.dp.size, dp_rank=ps.dp.rank
    )


def _loop(
    run: Run, data: DataIterator, datasets: Any, metrics: Metrics, recorder: CommRecorder | None = None
) -> list[dict[str, Any]]:
    cfg, t = run.cfg, run.cfg.train
    start = _resume(run, data, metrics)
    saver = ckpt.AsyncSaver() if t.save and t.async_save else None
    tokens_per_step = run.plan.tokens_per_step
    one_device = device_peak(run.device, t.precision, t.peak_tflops)
    metrics.note(f"MFU peak: {one_device.describe()}")
    peak = one_device.flops * dist.get_world_size()
    flops_per_step = flops_per_token(run.model, t.seq_len) * tokens_per_step
    hardware_flops_per_step = flops_per_token(run.model, t.seq_len, t.recompute) * tokens_per_step
    records: list[dict[str, Any]] = []
    step = start
    metrics.start(t.steps, start)
    skips = SkipCounter(t.on_nan, t.max_skipped_steps, scaled=run.scaler is not None)
    with stop_on_signal() as stop, watch(t.stall_timeout) as watchdog:
        for step in range(start, t.steps):
            began = time.perf_counter()
            lr = lr_at(step, cfg.optim, t.steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            micro = next(data)
            data_seconds = time.perf_counter() - began
            with recorder if recorder is not None else nullcontext():
                loss, norm, skipped = train_step(run, micro)
            skipped = skips.check(step + 1, loss, norm, skipped)
            seconds = time.perf_counter() - began
            record = {
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "grad_norm": norm,
                "tokens_per_s": tokens_per_step / seconds,
                "mfu": flops_per_step / seconds / peak,
                "hfu": hardware_flops_per_step / seconds / peak,
                "mfu_peak": one_device.source,
                "skipped": skipped,
                "step_time_s": seconds,
                "data_time_s": data_seconds,
                "tokens": (step + 1) * tokens_per_step,
                **memory_mb(run.device),
            }
            if run.model.mtp_depth:  # the loss above is the main one; the trained objective adds this
                record["mtp_loss"] = _global_loss(run, run.losses.mtp)
            if run.scaler is not None:
                record["loss_scale"] = float(run.scaler.scale)
            if recorder is not None:
                record.update(comm_fields(recorder))
                recorder.clear()
            records.append(record)
            if step == start:  # the optimizer's state exists now
                metrics.note(_memory_note(run))
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                metrics.step(record, t.steps)
            if t.eval_every and (step + 1) % t.eval_every == 0:
                metrics.evaluation(evaluate(run, datasets.valid, step + 1))
            stop.agree(run.device)
            if t.exit_interval and (step + 1) % t.exit_interval == 0 and step + 1 < t.steps:
                stop.requested = stop.requested or "exit_interval"
            last = step + 1 == t.steps or stop.requested
            if t.save and ((t.save_every and (step + 1) % t.save_every == 0) or last):
                metrics.checkpoints.saved(step + 1, *_save(run, data, step + 1, saver))
            metrics.checkpoints.poll()
            watchdog.beat()
            if stop.requested:
                metrics.note(f"stopping after step {step + 1} ({stop.requested})")
                break
        run.engine.wait_param_gather()  # ZeRO-1/2's last weight gathers: the model is whole again
        if saver is not None:
            saver.close()
    metrics.checkpoints.poll(finished=True)
    if skips.skipped:
        metrics.note(skips.summary())
    stop.raise_if_signalled()
    return records


def _memory_note(run: Run) -> str:
    """This rank's bytes per parameter: the stored parameters, their gradients and the optimizer's share."""
    per = run.engine.bytes_per_param()
    return (
        f"bytes per parameter (rank 0, zero={run.cfg.train.zero}, dp_cp={run.ps.dp_cp.size}): params "
        f"{per['params']:.2f} + grads {per['grads']:.2f} + optimizer {per['optimizer']:.2f} = {per['total']:.2f}"
    )


def comm_fields(recorder: CommRecorder) -> dict[str, float]:
    """This rank's bytes and seconds of communication per axis since the recorder was last cleared, as
    flat ``comm_<axis>_bytes`` / ``comm_<axis>_s`` fields (one step's, in the loop)."""
    out: dict[str, float] = {}
    for axis, total in sorted(recorder.by_axis().items()):
        out[f"comm_{axis}_bytes"] = int(total["bytes"])
        out[f"comm_{axis}_s"] = total["seconds"]
    return out


def train_step(run: Run, micro: list[np.ndarray]) -> tuple[float, float, bool]:
    """One optimizer step over this rank's micro-batches: the global mean loss (the main language-model
    loss, without the MTP loss), the global grad norm,
    and whether the step was skipped for a non-finite gradient. The same code for every ZeRO stage: the
    engine accumulates over the micro-batches, reduces once, and runs the one step protocol."""
    ps, engine = run.ps, run.engine
    batches = [torch.from_numpy(np.asarray(m, dtype=np.int64)).to(run.device) for m in micro]
    pairs = [split_batch(b, ps) for b in batches]
    engine.zero_grad()
    # the executor weights each micro-batch's loss by loss_weight / microbatches (gradients summed over
    # dp_cp); a router's share adds up over CP to the whole loss, so its weight is cp times that
    scale_router_losses(run.chunks, loss_weight(run.ps, run.scaler) / run.microbatches * ps.cp.size)
    run.losses.clear()
    run.executor.step([i for i, _ in pairs], [lab for _, lab in pairs])
    engine.finish_grad_sync()
    # what the model's split leaves partial, on the reduced gradients: SP sums over TP, tied copies
    if run.cfg.train.sequence_parallel:
        sync_sequence_parallel_grads(run.chunks, ps, engine.grad_of)
    sync_tied_embedding_grads(run.chunks, ps, engine.grad_of)
    experts = run.model.num_experts > 0
    clip = ClipGroups(tp=ps.tp, pp=ps.pp, ep=ps.ep if experts else None, etp=ps.etp if experts else None)
    norm, skipped = engine.step(_clip_threshold(run), clip, run.scaler)
    if run.expert_bias is not None:  # aux-loss-free balancing, from the step's tokens per expert
        run.expert_bias.step(skipped)
    return _global_loss(run, run.losses.lm), norm, skipped


def _clip_threshold(run: Run) -> float:
    """The clipping threshold (``inf``: measure the norm without clipping)."""
    return run.cfg.optim.clip_grad or math.inf


def _global_loss(run: Run, losses: list[torch.Tensor]) -> float:
    """The mean loss over micro-batches and data-parallel ranks, known on every rank."""
    ps = run.ps
    counts = len(losses) > 0 and ps.tp.rank == 0  # the executor gives losses where the last stage is
    total = torch.zeros(2, device=run.device)
    if counts:  # summed on the device: the .item() below is the step's one host sync for the loss
        total[0] = torch.stack([x.detach().float().reshape(()) for x in losses]).sum()
        total[1] = len(losses)
    comm.all_reduce(total)
    return (total[0] / total[1]).item()


def evaluate(run: Run, dataset: Any, step: int) -> dict[str, Any]:
    """Mean loss and perplexity over ``eval_steps`` global batches of the validation set."""
    ps, t = run.ps, run.cfg.train
    if dataset is None:
        raise TrainerError("evaluation needs a validation set: set data.valid_fraction > 0")
    data = _data_iterator(run, dataset)
    losses = []
    for _ in range(t.eval_steps):
        pairs = [
            split_batch(b, ps)
            for b in (torch.from_numpy(np.asarray(m, dtype=np.int64)).to(run.device) for m in next(data))
        ]
        run.losses.clear()
        run.executor.evaluate([i for i, _ in pairs], [lab for _, lab in pairs])
        losses.append(_global_loss(run, run.losses.lm))
    loss = sum(losses) / len(losses)
    return {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _save(run: Run, data: DataIterator, step: int, saver: ckpt.AsyncSaver | None) -> tuple[Path, Any]:
    """Save the run at ``step``; return the checkpoint's path and the background save's handle (or None)."""
    path = ckpt.step_dir(run.cfg.train.save, step)
    return path, save_run(run, step, data.state_dict(), path, keep=run.cfg.train.keep, saver=saver)


def _resume(run: Run, data: DataIterator, metrics: Metrics) -> int:
    """Load the newest complete checkpoint under ``--load`` (else ``--save``), if any; return its step."""
    t = run.cfg.train
    root = t.load or t.save
    if not root:
        return 0
    explicit = (Path(root) / "index.json").exists()
    for found in checkpoints_to_try(t, metrics.note, first_rank=dist.get_rank() == 0):
        try:
            return _resume_from(run, data, metrics, found)
        except ckpt.CheckpointError as error:
            if explicit:
                raise
            metrics.note(f"skipping checkpoint {found}: {error}")
    if t.load:
        raise TrainerError(f"--load {root}: no intact checkpoint there")
    return 0


def _resume_from(run: Run, data: DataIterator, metrics: Metrics, found: Path) -> int:
    loaded = load_run(run, found, data.state_dict())
    if loaded.data is None:
        metrics.note(f"initialised the model from {found}")
        return 0
    data.load_state_dict(loaded.data)
    metrics.note(f"resumed from {found} at step {loaded.step}: {loaded.plan_change}")
    return loaded.step
