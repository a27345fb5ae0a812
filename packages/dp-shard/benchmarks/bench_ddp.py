"""Step time (forward + backward + gradient sync) and peak memory of ``dp_shard.DataParallel`` against
``torch.nn.parallel.DistributedDataParallel`` at DP=2 on CPU over gloo, one thread per rank, in one run.

    python packages/dp-shard/benchmarks/bench_ddp.py [--layers 8 --hidden 512 --batch 64 --bucket-mb 2]

Both wrap the same MLP (``--layers`` x ``Linear(hidden, hidden)`` + ReLU) with the same bucket size;
their gradients after one step are compared before timing. A measurement is the slowest rank's time
for ``--iters`` steps; the two alternate over ``--rounds`` rounds and the median round is reported.
ratio = ours / torch DDP (below 1.0: ours is faster). Peak memory is the growth of each rank's peak
resident set while building the wrapper and running the steps, each wrapper in fresh processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dp_shard import DataParallel
from pstate.testing import Harness


def build(kind: str, layers: int, hidden: int, bucket_mb: float):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(hidden, hidden), nn.ReLU())])
    if kind == "ours":
        wrapped = DataParallel(model, group=dist.group.WORLD, bucket_size_mb=bucket_mb)
        return wrapped, wrapped.finish_grad_sync, wrapped.zero_grad_buffer
    wrapped = DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    return wrapped, lambda: None, lambda: wrapped.zero_grad(set_to_none=True)


def step(model, finish, zero, x: torch.Tensor) -> None:
    zero()
    model(x).square().mean().backward()
    finish()


def inputs(hidden: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, hidden, generator=torch.Generator().manual_seed(dist.get_rank()))


def measure(layers: int, hidden: int, batch: int, bucket_mb: float, iters: int, rounds: int):
    x = inputs(hidden, batch)
    runs = {kind: build(kind, layers, hidden, bucket_mb) for kind in ("ours", "torch")}
    for run in runs.values():
        step(*run, x)
    grads = [[p.grad for p in run[0].module.parameters()] for run in runs.values()]
    difference = max((a - b).abs().max().item() for a, b in zip(*grads))
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    for _ in range(rounds):
        for kind, run in runs.items():
            for _ in range(2):  # warm-up
                step(*run, x)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                step(*run, x)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[kind].append(elapsed.item() / iters)
    buckets = len(runs["ours"][0]._buckets)
    return difference, buckets, {kind: statistics.median(t) for kind, t in times.items()}


def peak_memory(kind: str, layers: int, hidden: int, batch: int, bucket_mb: float, iters: int) -> float:
    """Growth of this rank's peak RSS in MiB (ru_maxrss is in KiB on Linux)."""
    x = inputs(hidden, batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = build(kind, layers, hidden, bucket_mb)
    for _ in range(iters):
        step(*run, x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bucket-mb", type=float, default=2.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    shape = (args.layers, args.hidden, args.batch, args.bucket_mb)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, dp=2 over gloo, one thread per rank")
    print(f"{args.layers} x Linear({args.hidden}), batch {args.batch} per rank, buckets of {args.bucket_mb} MiB")
    with Harness(timeout_s=1800) as harness:
        difference, buckets, times = harness.run(2, measure, *shape, args.iters, args.rounds)[0]
    memory = {}
    for kind in ("ours", "torch"):
        with Harness(timeout_s=600) as harness:  # fresh processes: ru_maxrss only grows
            memory[kind] = harness.run(2, peak_memory, kind, *shape, args.iters)
    print(f"our buckets: {buckets}; max |grad difference| after one step: {difference:.2e}")
    print(f"{'':<10} {'step ms':>9} {'peak MiB/rank':>15}")
    for kind, label in (("ours", "ours"), ("torch", "torch DDP")):
        peaks = "/".join(f"{m:.1f}" for m in memory[kind])
        print(f"{label:<10} {times[kind] * 1e3:>9.2f} {peaks:>15}")
    print(f"ratio ours / torch DDP: {times['ours'] / times['torch']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
