"""What the dp-shard benchmarks share: inputs, alternating timed rounds, and peak-memory growth.

Imported by the ``bench_*.py`` scripts beside it (their directory is on ``sys.path`` when run).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pstate.testing import Harness


def add_model_options(parser: argparse.ArgumentParser, *, iters: int, rounds: int) -> None:
    """``--layers --hidden --batch --iters --rounds`` (the MLP every dp-shard benchmark times)."""
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--rounds", type=int, default=rounds)


def inputs(hidden: int, batch: int) -> torch.Tensor:
    """This rank's input batch (different on every rank, as data parallelism has it)."""
    return torch.randn(batch, hidden, generator=torch.Generator().manual_seed(dist.get_rank()))


def alternate_rounds(
    steps: dict[str, Callable[[], Any]], iters: int, rounds: int, cpu: dict[str, float] | None = None
) -> dict[str, float]:
    """Seconds per step of each entry: the slowest rank's time for ``iters`` steps after two warm-up
    steps; the entries take turns for ``rounds`` rounds and the median round is returned. ``cpu``, when
    given, receives the same for the CPU time of the rank's process (its threads included, waiting not):
    what a step costs a rank whatever the other processes on an oversubscribed machine are doing."""
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    cpu_times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(rounds):
        for kind, step in steps.items():
            for _ in range(2):
                step()
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                step()
            elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - start_cpu])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[kind].append(elapsed[0].item() / iters)
            cpu_times[kind].append(elapsed[1].item() / iters)
    if cpu is not None:
        cpu.update({kind: statistics.median(t) for kind, t in cpu_times.items()})
    return {kind: statistics.median(t) for kind, t in times.items()}


def rss_growth_mib(work: Callable[[], Any]) -> float:
    """Growth of this process's peak resident set (MiB) while ``work`` runs (ru_maxrss is KiB on Linux)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_memory(fn: Callable[..., float], *args: Any) -> dict[str, list[float]]:
    """``fn(kind, *args)`` on two fresh ranks per kind (``ours``, ``torch``): ru_maxrss only grows."""
    memory = {}
    for kind in ("ours", "torch"):
        with Harness(timeout_s=600) as harness:
            memory[kind] = harness.run(2, fn, kind, *args)
    return memory
