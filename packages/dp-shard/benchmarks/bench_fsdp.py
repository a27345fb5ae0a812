"""Step time (forward + backward + AdamW step) and peak memory of ``dp_shard``'s ``fully_shard`` against
FSDP2 (``torch.distributed.fsdp.fully_shard`` on a CPU ``DeviceMesh``) at DP=2 over gloo, one thread
per rank, in one run.

    python packages/dp-shard/benchmarks/bench_fsdp.py [--layers 8 --hidden 512 --batch 64 --no-optimizer]

Both shard the same MLP (``--layers`` blocks of ``Linear(hidden, hidden)`` + ReLU) with one unit per
block and the root holding nothing, gather in fp32 and prefetch the next block (FSDP2 does by
default). Their losses over the first three steps are compared before timing. A measurement is the
slowest rank's time for ``--iters`` steps; the two alternate over ``--rounds`` rounds and the median
round is reported (``--no-optimizer``: forward + backward only). ratio = ours / FSDP2 (below 1.0:
ours is faster). Peak memory is the growth of each rank's peak resident set (``ru_maxrss``) while
building the model, sharding it and running the steps, each implementation in fresh processes, after
a warm-up that keeps lazy imports out of the count.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from bench_common import add_model_options, alternate_rounds, inputs, peak_memory, rss_growth_mib
from torch import nn

from dp_shard.fully_shard import fully_shard
from pstate.testing import Harness


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(h))


def build(kind: str, layers: int, hidden: int, optimize: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(hidden) for _ in range(layers)])
    if kind == "ours":
        fully_shard(model, group=dist.group.WORLD, units=Block)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard as fsdp2_fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model:
            fsdp2_fully_shard(block, mesh=mesh)
        fsdp2_fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01) if optimize else None


def step(model: nn.Module, optimizer: torch.optim.Optimizer | None, x: torch.Tensor) -> float:
    loss = model(x).square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad()
    return loss.item()


def measure(layers: int, hidden: int, batch: int, optimize: bool, iters: int, rounds: int):
    x = inputs(hidden, batch)
    runs = {kind: build(kind, layers, hidden, optimize) for kind in ("ours", "torch")}
    losses = {kind: [step(*run, x) for _ in range(3)] for kind, run in runs.items()}
    difference = max(abs(a - b) for a, b in zip(losses["ours"], losses["torch"]))
    times = alternate_rounds({kind: lambda run=run: step(*run, x) for kind, run in runs.items()}, iters, rounds)
    return difference, times


def rank_peak_memory(kind: str, layers: int, hidden: int, batch: int, optimize: bool, iters: int) -> float:
    """Growth of this rank's peak RSS in MiB (ru_maxrss is in KiB on Linux), after a warm-up that
    imports what either side imports lazily (FSDP2, the optimizer's first step) outside the count."""
    import torch.distributed.fsdp

    x = inputs(hidden, batch)
    warm = nn.Parameter(torch.zeros(1))
    warm.grad = torch.zeros(1)
    torch.optim.AdamW([warm]).step()

    def work() -> None:
        run = build(kind, layers, hidden, optimize)
        for _ in range(iters):
            step(*run, x)

    return rss_growth_mib(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, iters=10, rounds=5)
    parser.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=True, help="time AdamW's step")
    args = parser.parse_args()
    shape = (args.layers, args.hidden, args.batch, args.optimizer)
    model_mib = args.layers * (args.hidden + 1) * args.hidden * 4 / 2**20
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, dp=2 over gloo, one thread per rank")
    what = "forward + backward + AdamW step" if args.optimizer else "forward + backward"
    print(f"{args.layers} x Linear({args.hidden}) ({model_mib:.2f} MiB fp32), batch {args.batch} per rank; {what}")
    with Harness(timeout_s=1800) as harness:
        difference, times = harness.run(2, measure, *shape, args.iters, args.rounds)[0]
    memory = peak_memory(rank_peak_memory, *shape, args.iters)
    print(f"max |loss difference| over the first 3 steps: {difference:.2e}")
    print(f"{'':<10} {'step ms':>9} {'peak MiB/rank':>15}")
    for kind, label in (("ours", "ours"), ("torch", "FSDP2")):
        peaks = "/".join(f"{m:.1f}" for m in memory[kind])
        print(f"{label:<10} {times[kind] * 1e3:>9.2f} {peaks:>15}")
    print(f"ratio ours / FSDP2: {times['ours'] / times['torch']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
