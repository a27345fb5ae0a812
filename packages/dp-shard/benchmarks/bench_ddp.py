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

import torch
import torch.distributed as dist
from bench_common import add_model_options, alternate_rounds, inputs, peak_memory, rss_growth_mib
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


def measure(layers: int, hidden: int, batch: int, bucket_mb: float, iters: int, rounds: int):
    x = inputs(hidden, batch)
    runs = {kind: build(kind, layers, hidden, bucket_mb) for kind in ("ours", "torch")}
    for run in runs.values():
        step(*run, x)
    grads = [[p.grad for p in run[0].module.parameters()] for run in runs.values()]
    difference = max((a - b).abs().max().item() for a, b in zip(*grads))
    times = alternate_rounds({kind: lambda run=run: step(*run, x) for kind, run in runs.items()}, iters, rounds)
    buckets = len(runs["ours"][0]._buckets)
    return difference, buckets, times


def rank_peak_memory(kind: str, layers: int, hidden: int, batch: int, bucket_mb: float, iters: int) -> float:
    """Growth of this rank's peak RSS in MiB (ru_maxrss is in KiB on Linux)."""
    x = inputs(hidden, batch)

    def work() -> None:
        run = build(kind, layers, hidden, bucket_mb)
        for _ in range(iters):
            step(*run, x)

    return rss_growth_mib(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, iters=20, rounds=7)
    parser.add_argument("--bucket-mb", type=float, default=2.0)
    args = parser.parse_args()
    shape = (args.layers, args.hidden, args.batch, args.bucket_mb)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, dp=2 over gloo, one thread per rank")
    print(f"{args.layers} x Linear({args.hidden}), batch {args.batch} per rank, buckets of {args.bucket_mb} MiB")
    with Harness(timeout_s=1800) as harness:
        difference, buckets, times = harness.run(2, measure, *shape, args.iters, args.rounds)[0]
    memory = peak_memory(rank_peak_memory, *shape, args.iters)
    print(f"our buckets: {buckets}; max |grad difference| after one step: {difference:.2e}")
    print(f"{'':<10} {'step ms':>9} {'peak MiB/rank':>15}")
    for kind, label in (("ours", "ours"), ("torch", "torch DDP")):
        peaks = "/".join(f"{m:.1f}" for m in memory[kind])
        print(f"{label:<10} {times[kind] * 1e3:>9.2f} {peaks:>15}")
    print(f"ratio ours / torch DDP: {times['ours'] / times['torch']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
