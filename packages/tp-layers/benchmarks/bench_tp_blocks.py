"""Forward + backward of a TP=2 transformer MLP block and attention block: ``tp_layers`` against the same
blocks parallelised with PyTorch's DTensor tensor parallel (``ColwiseParallel`` / ``RowwiseParallel``,
plus ``SequenceParallel`` for the norm under SP), on CPU over gloo, in one run.

    python packages/tp-layers/benchmarks/bench_tp_blocks.py [--hidden 512 --seq 256 --batch 4 --iters 20]

Both versions start from the same full weights and their outputs are compared before timing. Each
measurement is the slowest rank's time for ``--iters`` steps; the versions alternate over ``--rounds``
rounds and the median round is reported. ratio = ours / DTensor (below 1.0: ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pstate.testing import Harness
from tp_layers import ColumnParallelLinear, RowParallelLinear, allreduce_sequence_parallel_grads, mark_sequence_parallel


class Block(nn.Module):
    """A pre-norm residual MLP or attention block; ``linear(in, out, kind)`` makes its linear layers."""

    def __init__(self, kind: str, hidden: int, heads: int, linear) -> None:
        super().__init__()
        self.kind, self.head_dim = kind, hidden // heads
        self.norm = nn.LayerNorm(hidden)
        if kind == "mlp":
            self.up, self.down = linear(hidden, 4 * hidden, "column"), linear(4 * hidden, hidden, "row")
        else:
            self.up, self.down = linear(hidden, 3 * hidden, "column"), linear(hidden, hidden, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        if self.kind == "mlp":
            return x + self.down(F.gelu(h))
        seq, batch = h.shape[:2]
        q, k, v = h.view(seq, batch, -1, 3, self.head_dim).permute(3, 1, 2, 0, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.down(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))


def ours(kind: str, hidden: int, heads: int, sp: bool) -> nn.Module:
    group = dist.group.WORLD

    def linear(n_in: int, n_out: int, style: str) -> nn.Module:
        layer = ColumnParallelLinear if style == "column" else RowParallelLinear
        return layer(n_in, n_out, group=group, sequence_parallel=sp)

    block = Block(kind, hidden, heads, linear)
    if sp:
        mark_sequence_parallel(block.norm)
    return block


def dtensor(kind: str, hidden: int, heads: int, sp: bool) -> nn.Module:
    block = Block(kind, hidden, heads, lambda n_in, n_out, style: nn.Linear(n_in, n_out))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if sp:
        plan = {
            "norm": SequenceParallel(sequence_dim=0),
            "up": ColwiseParallel(input_layouts=Shard(0)),
            "down": RowwiseParallel(output_layouts=Shard(0)),
        }
    else:
        plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    return parallelize_module(block, mesh, plan)


def step(block: nn.Module, x: torch.Tensor, sp: bool, reduce_sp: bool) -> torch.Tensor:
    y = block(x)
    y.sum().backward()
    if sp and reduce_sp:
        allreduce_sequence_parallel_grads(block, group=dist.group.WORLD)
    return y


def measure(kind: str, sp: bool, hidden: int, heads: int, seq: int, batch: int, iters: int, rounds: int):
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    mine = ours(kind, hidden, heads, sp)
    torch.manual_seed(0)  # same seed, same draws: the DTensor block starts from the full weights we slice
    theirs = dtensor(kind, hidden, heads, sp)
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1))
    if sp:
        x = x.chunk(tp, 0)[rank].contiguous()
    x.requires_grad_()
    difference = (step(mine, x, sp, True) - step(theirs, x, sp, False)).abs().max().item()
    times = {"ours": [], "dtensor": []}
    for _ in range(rounds):
        for name, block, reduce_sp in (("ours", mine, True), ("dtensor", theirs, False)):
            for _ in range(3):  # warm-up
                step(block, x, sp, reduce_sp)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                block.zero_grad(set_to_none=True)
                step(block, x, sp, reduce_sp)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed.item() / iters)
    return difference, {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, tp={args.tp} over gloo, one thread per rank")
    print(
        f"hidden={args.hidden} heads={args.heads} seq={args.seq} batch={args.batch}, {args.iters} steps x {args.rounds}"
    )
    print(f"{'block':<10} {'sp':<5} {'ours ms':>9} {'DTensor ms':>11} {'ratio':>7} {'max |diff|':>11}")
    with Harness(timeout_s=1800) as harness:
        for kind in ("mlp", "attention"):
            for sp in (False, True):
                shape = (args.hidden, args.heads, args.seq, args.batch, args.iters, args.rounds)
                difference, times = harness.run(args.tp, measure, kind, sp, *shape)[0]
                ratio = times["ours"] / times["dtensor"]
                print(
                    f"{kind:<10} {sp!s:<5} {times['ours'] * 1e3:>9.2f} {times['dtensor'] * 1e3:>11.2f} "
                    f"{ratio:>7.3f} {difference:>11.2e}"
                )


if __name__ == "__main__":
    main()
