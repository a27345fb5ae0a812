"""Step time (forward + backward + sharded AdamW step) and memory of ``dp_shard.ShardedOptimizer`` (ZeRO-1)
against ``torch.distributed.optim.ZeroRedundancyOptimizer`` over ``torch.nn.parallel.DistributedDataParallel``
(as users run it) at DP=2 on CPU over gloo, one thread per rank, in one run.

    python packages/dp-shard/benchmarks/bench_zero.py [--layers 8 --hidden 512 --batch 64 --bucket-mb 2]

Both train the same MLP (``--layers`` x ``Linear(hidden, hidden)`` + ReLU) with AdamW and the same bucket
size; their parameters after two steps are compared before timing. A measurement is the slowest rank's
time for ``--iters`` steps; the two alternate over ``--rounds`` rounds and the median round is reported.
ratio = ours / torch (below 1.0: ours is faster). Memory: the growth of each rank's peak resident set
(RSS) while building the optimizer and running the steps, each in fresh processes; and the tracked
optimizer bytes per rank: the wrapped AdamW's state tensors plus master-weight copies (none here: for
float32 parameters our masters are views of the parameters).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from bench_common import add_model_options, alternate_rounds, inputs, peak_memory, rss_growth_mib
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from dp_shard import ShardedOptimizer
from pstate.testing import Harness

LR = 1e-3


def build(kind: str, layers: int, hidden: int, bucket_mb: float):
    """(model to call, optimizer, parameters) for ``kind``."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(hidden, hidden), nn.ReLU())])
    if kind == "ours":
        optimizer = ShardedOptimizer(
            model.parameters(), torch.optim.AdamW, group=dist.group.WORLD, bucket_size_mb=bucket_mb, lr=LR
        )
        return model, optimizer, list(model.parameters())
    wrapped = DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    return wrapped, optimizer, list(model.parameters())


def step(model, optimizer, _params, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def optimizer_bytes(kind: str, optimizer) -> int:
    inner = optimizer.optimizer if kind == "ours" else optimizer.optim
    state = sum(v.nbytes for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    if kind == "ours":
        state += optimizer.memory_bytes()["master"]
    return state


def measure(layers: int, hidden: int, batch: int, bucket_mb: float, iters: int, rounds: int):
    x = inputs(hidden, batch)
    runs = {kind: build(kind, layers, hidden, bucket_mb) for kind in ("ours", "torch")}
    for run in runs.values():
        for _ in range(2):
            step(*run, x)
    params = [run[2] for run in runs.values()]
    difference = max((a - b).abs().max().item() for a, b in zip(*params))
    state = {kind: optimizer_bytes(kind, run[1]) for kind, run in runs.items()}
    times = alternate_rounds({kind: lambda run=run: step(*run, x) for kind, run in runs.items()}, iters, rounds)
    return difference, state, times


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
    add_model_options(parser, iters=10, rounds=5)
    parser.add_argument("--bucket-mb", type=float, default=2.0)
    args = parser.parse_args()
    shape = (args.layers, args.hidden, args.batch, args.bucket_mb)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, dp=2 over gloo, one thread per rank, AdamW")
    print(f"{args.layers} x Linear({args.hidden}), batch {args.batch} per rank, buckets of {args.bucket_mb} MiB")
    with Harness(timeout_s=1800) as harness:
        results = harness.run(2, measure, *shape, args.iters, args.rounds)
    difference, _, times = results[0]
    memory = peak_memory(rank_peak_memory, *shape, args.iters)
    print(f"max |parameter difference| after two steps: {difference:.2e}")
    print(f"{'':<16} {'step ms':>9} {'peak RSS MiB/rank':>19} {'optimizer MiB/rank':>20}")
    for kind, label in (("ours", "ours ZeRO-1"), ("torch", "torch ZeRO+DDP")):
        peaks = "/".join(f"{m:.1f}" for m in memory[kind])
        state = "/".join(f"{r[1][kind] / 2**20:.1f}" for r in results)
        print(f"{label:<16} {times[kind] * 1e3:>9.2f} {peaks:>19} {state:>20}")
    print(f"ratio ours / torch ZeroRedundancyOptimizer: {times['ours'] / times['torch']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
