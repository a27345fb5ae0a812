"""What rank 0 tells the person running the job: a start banner (model, layout, precision, data, where
files go), a progress bar on a terminal, a line per checkpoint saved. Other ranks stay silent."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from dp_shard import bytes_per_param

from ..config import RunPlan
from .setup import Run


def banner(run: Run, datasets: Any) -> list[str]:
    """The lines that say what this run is, before its first step."""
    from ..plan import parameter_count  # plan imports train.flops: not at module level

    cfg, m, t, ps = run.cfg, run.model, run.cfg.train, run.ps
    dense, expert = parameter_count(m)
    experts = f" ({_count(expert)} of them in experts)" if expert else ""
    sizes = f"tp {ps.tp.size} x pp {ps.pp.size} x dp {ps.dp.size} x cp {ps.cp.size}"
    if m.num_experts:
        sizes += f", ep {ps.ep.size}"
    modes = layout_modes(run.plan, t.recompute)
    global_batch, tokens_per_step = run.plan.global_batch, run.plan.tokens_per_step
    kv = f"MLA, latent {m.kv_lora_rank}" if m.attention == "mla" else f"{m.num_kv_heads} kv"
    lines = [
        f"model: {_count(dense + expert)} parameters{experts}; hidden {m.hidden}, {m.layers} layers, {m.heads} heads "
        f"({kv}), ffn {m.ffn}, vocab {m.vocab_size}, {m.mlp}/{m.norm}/{m.position}",
        f"layout: {dist.get_world_size()} ranks = {sizes}; {', '.join(modes)}; {t.precision} on "
        f"{run.device.type} ({dist.get_backend()})",
        f"states: {_states(run)}",
        f"data: {_data(cfg, datasets)}",
        f"batch: {global_batch} samples x {t.seq_len} tokens = {tokens_per_step:,} tokens per step; "
        f"{t.steps} steps ({t.steps * tokens_per_step:,} tokens)",
        f"checkpoints: {_checkpoints(t)}",
        f"metrics: {_metrics(t)}",
    ]
    return lines


def layout_modes(plan: RunPlan, recompute: str | None = None) -> list[str]:
    """How the plan runs, for the banner's layout line: SP, the data-parallel mode (HSDP: the ranks of a
    shard group, CP ranks included, x its replicas), the CP attention, the pipeline schedule and stages,
    the recomputation."""
    modes = ["sequence parallel"] if plan.sequence_parallel else []
    modes.append({0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3 (FSDP)"}[plan.zero])
    if plan.dp_replicate > 1:
        modes[-1] = f"HSDP (ZeRO-3 over {plan.dp_shard * plan.cp} ranks x {plan.dp_replicate} replicas)"
    if plan.cp > 1:
        a2a = f" in all-to-all groups of {plan.cp_a2a}" if plan.cp_attention == "hierarchical" else ""
        modes.append(f"{plan.cp_attention} CP attention{a2a}")
    if plan.pp > 1:
        vpp = f", vpp {plan.vpp}" if plan.vpp > 1 else ""
        stages = f", layers per stage {list(plan.pipeline_layout)}" if plan.pipeline_layout else ""
        modes.append(f"{plan.schedule} over {plan.microbatches} micro-batches{vpp}{stages}")
    if recompute:
        modes.append(f"{recompute} recomputation")
    return modes


def _states(run: Run) -> str:
    """The bytes per parameter per rank the mode keeps (``dp_shard.bytes_per_param``'s table) for the dense
    parameters (experts shard over ``edp``)."""
    t, d = run.cfg.train, run.ps.dp_cp.size
    weight = next(iter(run.named.values())).dtype
    sixteen = weight.itemsize == 2  # 16-bit weights: fp32 main gradients and masters
    b = bytes_per_param(t.zero, d, weight_dtype=weight, master_dtype=torch.float32 if sixteen else None)
    masters = "fp32 masters, " if sixteen else ""
    dtype = str(weight).removeprefix("torch.")
    reduce = f", gradients reduced in {t.grad_reduce_dtype}" if t.zero < 3 else ""
    return (
        f"{b['total']:.2f} bytes per parameter per rank: {dtype} weights {b['params']:.2f} + fp32 gradients "
        f"{b['grads']:.2f} + {masters}AdamW {b['optimizer']:.2f} (zero={t.zero}, dp_cp={d}{reduce})"
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _data(cfg: Any, datasets: Any) -> str:
    parts = getattr(datasets.train, "datasets", [datasets.train])
    tokens = sum(p.num_tokens for p in parts)
    tok = datasets.tokenizer.name
    if cfg.data.packing == "pack":  # the share of sample tokens that are document tokens
        fill = tokens / sum(p.samples_per_epoch * p.seq_len for p in parts)
        tok += f"; whole documents packed, {fill:.1%} of sample tokens filled"
    if cfg.data.paths:
        where = ", ".join(cfg.data.paths)
        return f"{where}: {tokens:,} training tokens, tokenizer {tok}"
    cache = Path(str(parts[0].data.prefix)).parent
    return (
        f"embedded corpus (Python's standard library source): {tokens:,} training tokens, tokenizer {tok}; "
        f"cached in {cache}"
    )


def _checkpoints(t: Any) -> str:
    if not t.save:
        return "none saved (--save DIR keeps them)" + (f"; starting from {t.load}" if t.load else "")
    when = f"every {t.save_every} steps and at the end" if t.save_every else "at the end"
    start = f"; starting from {t.load}" if t.load else "; resumes from the newest there"
    return f"{t.save} ({when}, the newest {t.keep} kept{', written in the background' if t.async_save else ''}){start}"


def _metrics(t: Any) -> str:
    sinks = [f"JSON lines in {t.metrics_file}"] if t.metrics_file else []
    if t.tensorboard:
        sinks.append(f"TensorBoard in {t.tensorboard}")
    return ", ".join(sinks) if sinks else "this log only (--metrics-file FILE, --tensorboard DIR)"


def memory_mb(device: Any) -> dict[str, float]:
    """Peak memory allocated and memory reserved on the device (GPU), or the process's peak RSS (CPU), in MiB."""
    if device.type == "cuda":
        return {
            "memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
        }
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"memory_mb": rss, "memory_reserved_mb": rss}


class Checkpoints:
    """Says "saved checkpoint step N to PATH" through ``say`` once each save is complete (a background save
    when it is done)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self._pending: list[tuple[int, Path, Any]] = []

    def saved(self, step: int, path: Path, handle: Any = None) -> None:
        """A save of ``step`` to ``path`` returned; ``handle``: the background save's, still writing."""
        self._pending.append((step, path, handle))
        self.poll()

    def poll(self, *, finished: bool = False) -> None:
        """Report the saves that are complete (``finished``: every one is)."""
        still = []
        for step, path, handle in self._pending:
            if finished or handle is None or handle.done():
                self.say(f"saved checkpoint step {step} to {path}")
            else:
                still.append((step, path, handle))
        self._pending = still


class ProgressBar:
    """A ``rich`` progress bar (elapsed, ETA, loss, tokens/s) when ``stream`` is a terminal, else nothing;
    ``print`` writes lines above the bar."""

    def __init__(self, stream: TextIO, total: int, start: int, *, enabled: bool = True):
        self.stream, self._bar, self.began = stream, None, time.perf_counter()
        if not (enabled and stream.isatty()):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=Console(file=stream), transient=False,
        )  # fmt: skip
        self._task = self._bar.add_task("train", total=total, completed=start, status="")
        self._bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tokens/s"
            self._bar.update(self._task, completed=step, status=status)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
