"""Forward + backward of a TP=2 transformer MLP block and attention block: ``tp_layers`` against the same
blocks parallelised with PyTorch's DTensor tensor parallel (``ColwiseParallel`` / ``RowwiseParallel``,
plus ``SequenceParallel`` for the norm under SP), on CPU over gloo, in one run.

    python packages/tp-layers/benchmarks/bench_tp_blocks.py [--hidden 512 --seq 256 --batch 4 --iters 20]

Both versions start from the same full weights and their outputs are compared before timing. Each
measurement is the slowest rank's time for ``--iters`` steps; the versions alternate over ``--rounds``
rounds (A B A B ...) and the median round is reported. ratio = ours / DTensor (below 1.0: ours is faster).
Next to the wall time, the CPU time of a step summed over both ranks' processes (``time.process_time``,
gloo's threads included): it counts work, not waits, so it moves much less with the machine's load.

A step is the same work on both sides: forward, backward, and the gradients of the sequence-parallel
parameters (the norm's, replicated over TP but used on a sequence shard) completed over TP. Ours sums
them in one all-reduce (``allreduce_sequence_parallel_grads``); DTensor leaves them as ``Partial`` and
its step redistributes them to ``Replicate`` (one all-reduce each), which an optimizer step needs.
The row ``dt partial`` is DTensor without that completion, the comparison this benchmark made before.
Under SP two variants of ours: the default re-gathers the input of the column layer in backward (the
memory of one sequence shard kept per layer); ``keep`` keeps the gathered input, as DTensor does.

Each block's step is also profiled once per version (``torch.profiler``): the collectives per step
(all-gathers / reduce-scatters / all-reduces) and the copies (``copy_``, ``clone``, ``cat``, with their
MiB); these counts do not depend on the load of the machine, unlike the times. A reduce-scatter that
gloo runs as an in-place all-reduce (``pstate.comm.reduce_scatter(scratch_input=True)``) counts as the
reduce-scatter it is. ``--profile`` prints each version's ops by self CPU time (rank 0, five steps).

``--qkv`` picks the layout of the fused QKV projection's output (see ``Block``): ``split`` (default, the
trainer's attention) or ``unbind`` (per-head interleaved, what this benchmark used before: one more copy
of the QKV gradient per step, on both sides).
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
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pstate.collectives import IN_PLACE_REDUCE_SCATTER
from pstate.testing import Harness
from tp_layers import ColumnParallelLinear, RowParallelLinear, allreduce_sequence_parallel_grads, mark_sequence_parallel


class Block(nn.Module):
    """A pre-norm residual MLP or attention block; ``linear(in, out, kind)`` makes its linear layers.

    ``qkv`` is the layout of each rank's slice of the fused QKV output: ``"split"`` (the trainer's
    ``Attention``): the rank's query heads, then its key heads, then its value heads, split on the last
    dimension (backward concatenates the three gradients: one copy); ``"unbind"``: per head its query,
    key and value, unbound from one view (backward stacks them and copies the stack back into the
    projection's layout: two copies)."""

    def __init__(self, kind: str, hidden: int, heads: int, linear, qkv: str = "split") -> None:
        super().__init__()
        self.kind, self.head_dim, self.qkv = kind, hidden // heads, qkv
        self.norm = nn.LayerNorm(hidden)
        if kind == "mlp":
            self.up, self.down = linear(hidden, 4 * hidden, "column"), linear(4 * hidden, hidden, "row")
        else:
            self.up, self.down = linear(hidden, 3 * hidden, "column"), linear(hidden, hidden, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        if self.kind == "mlp":
            return x + self.down(F.gelu(h))
        seq, batch, d = h.size(0), h.size(1), self.head_dim
        if self.qkv == "split":
            q, k, v = (t.view(seq, batch, -1, d).permute(1, 2, 0, 3) for t in h.split(h.size(-1) // 3, dim=-1))
        else:
            q, k, v = h.view(seq, batch, -1, 3, d).permute(3, 1, 2, 0, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.down(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))


def ours(kind: str, hidden: int, heads: int, sp: bool, keep: bool = False, qkv: str = "split") -> nn.Module:
    group = dist.group.WORLD

    def linear(n_in: int, n_out: int, style: str) -> nn.Module:
        if style == "column":
            return ColumnParallelLinear(n_in, n_out, group=group, sequence_parallel=sp, keep_gathered_input=keep)
        return RowParallelLinear(n_in, n_out, group=group, sequence_parallel=sp)

    block = Block(kind, hidden, heads, linear, qkv)
    if sp:
        mark_sequence_parallel(block.norm)
    return block


def dtensor(kind: str, hidden: int, heads: int, sp: bool, qkv: str = "split") -> nn.Module:
    block = Block(kind, hidden, heads, lambda n_in, n_out, style: nn.Linear(n_in, n_out), qkv)
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


def step(block: nn.Module, x: torch.Tensor, sp: bool, mode: str) -> torch.Tensor:
    """Forward, backward and (``mode`` ``"ours"`` or ``"dtensor"``) the SP gradients completed; ``"partial"``
    leaves DTensor's ``Partial`` gradients as they are (what this benchmark measured before)."""
    y = block(x)
    y.sum().backward()
    if sp and mode == "dtensor":
        for param in block.parameters():
            if param.grad is not None and any(isinstance(p, Partial) for p in param.grad.placements):
                param.grad = param.grad.redistribute(placements=[Replicate()])
    elif sp and mode == "ours":
        allreduce_sequence_parallel_grads(block, group=dist.group.WORLD)
    return y


COPIES = ("aten::copy_", "aten::clone", "aten::cat")


def op_counts(block: nn.Module, x: torch.Tensor, sp: bool, mode: str) -> dict[str, float]:
    """Collectives (all-gather, reduce-scatter, all-reduce calls) and copies (calls, MiB) of one step."""
    block.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step(block, x, sp, mode)
    counts = {"allgather": 0, "reduce_scatter": 0, "allreduce": 0, "copies": 0, "copy MiB": 0.0}
    for event in prof.events():
        name = event.name
        if name.startswith("c10d::"):
            in_place = event.cpu_parent is not None and event.cpu_parent.name == IN_PLACE_REDUCE_SCATTER
            for kind in ("allgather", "reduce_scatter", "allreduce"):
                counts[kind] += (kind == "reduce_scatter") if in_place else kind in name
        elif name in COPIES and not _nested_copy(event):
            counts["copies"] += 1
            counts["copy MiB"] += 4 * _numel(event.input_shapes[0]) / 2**20 if event.input_shapes[0] else 0.0
    return counts


def _numel(shape: list) -> int:
    n = 1
    for size in shape if shape and isinstance(shape[0], int) else []:
        n *= size
    return n


def _nested_copy(event) -> bool:
    """A copy inside another copy (``clone`` calls ``copy_``): counted once, as the outer one."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in COPIES:
            return True
        parent = parent.cpu_parent
    return False


def op_table(block: nn.Module, x: torch.Tensor, sp: bool, mode: str, steps: int = 5, rows: int = 14) -> str:
    """The ops of ``steps`` steps by self CPU time (this rank's threads; waits count as their caller's)."""
    for _ in range(2):
        step(block, x, sp, mode)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            block.zero_grad(set_to_none=True)
            step(block, x, sp, mode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def measure(
    kind: str, sp: bool, hidden: int, heads: int, seq: int, batch: int, iters: int, rounds: int, qkv: str, profile: bool
):
    rank, tp = dist.get_rank(), dist.get_world_size()
    versions = {}
    for name, keep in (("ours", False), ("ours keep", True))[: 2 if sp else 1]:
        torch.manual_seed(0)
        versions[name] = (ours(kind, hidden, heads, sp, keep, qkv), "ours")
    torch.manual_seed(0)  # same seed, same draws: the DTensor block starts from the full weights we slice
    block = dtensor(kind, hidden, heads, sp, qkv)
    versions["dtensor"] = (block, "dtensor")
    if sp:
        versions["dt partial"] = (block, "partial")
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1))
    if sp:
        x = x.chunk(tp, 0)[rank].contiguous()
    x.requires_grad_()
    outputs = [step(block, x, sp, mode) for block, mode in versions.values()]
    difference = max((out - outputs[-1]).abs().max().item() for out in outputs[:-1])
    counts = {name: op_counts(block, x, sp, mode) for name, (block, mode) in versions.items()}
    tables = {name: op_table(block, x, sp, mode) for name, (block, mode) in versions.items()} if profile else {}
    times = {name: [] for name in versions}
    cpu = {name: [] for name in versions}
    for _ in range(rounds):
        for name, (block, mode) in versions.items():
            for _ in range(3):  # warm-up
                step(block, x, sp, mode)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(iters):
                block.zero_grad(set_to_none=True)
                step(block, x, sp, mode)
            elapsed = torch.tensor([time.perf_counter() - start])
            used = torch.tensor([time.process_time() - cpu_start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(used)
            times[name].append(elapsed.item() / iters)
            cpu[name].append(used.item() / iters)
    medians = {name: (statistics.median(times[name]), statistics.median(cpu[name])) for name in versions}
    return difference, medians, counts, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--blocks", nargs="+", default=["mlp", "attention"], choices=["mlp", "attention"])
    parser.add_argument("--sp", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--qkv", default="split", choices=["split", "unbind"], help="QKV layout (see Block)")
    parser.add_argument("--profile", action="store_true", help="print each version's ops by self CPU time")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, tp={args.tp} over gloo, one thread per rank")
    print(
        f"hidden={args.hidden} heads={args.heads} seq={args.seq} batch={args.batch}, {args.iters} steps x {args.rounds}"
        f", qkv={args.qkv}"
    )
    header = (
        f"{'block':<10} {'sp':<5} {'version':<10} {'ms':>8} {'ratio':>6} {'CPU ms':>8} {'ratio':>6} {'AG/RS/AR':>9}"
    )
    print(f"{header} {'copies':>7} {'MiB':>6} {'max |diff|':>11}")
    with Harness(timeout_s=3600) as harness:
        for kind in args.blocks:
            for sp in (mode == "on" for mode in args.sp):
                shape = (args.hidden, args.heads, args.seq, args.batch, args.iters, args.rounds)
                run = harness.run(args.tp, measure, kind, sp, *shape, args.qkv, args.profile)
                difference, times, counts, tables = run[0]
                wall_dt, cpu_dt = times["dtensor"]
                for name, (seconds, used) in times.items():
                    c = counts[name]
                    collectives = f"{c['allgather']}/{c['reduce_scatter']}/{c['allreduce']}"
                    print(
                        f"{kind:<10} {sp!s:<5} {name:<10} {seconds * 1e3:>8.2f} {seconds / wall_dt:>6.3f} "
                        f"{used * 1e3:>8.2f} {used / cpu_dt:>6.3f} {collectives:>9} {c['copies']:>7} "
                        f"{c['copy MiB']:>6.2f} {difference:>11.2e}"
                    )
                for name, table in tables.items():
                    print(f"\n{kind} sp={sp} {name}, rank 0, 5 steps:\n{table}")


if __name__ == "__main__":
    main()
