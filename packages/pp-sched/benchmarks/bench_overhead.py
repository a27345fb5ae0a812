"""The executor's own per-step cost: every schedule run on stages that do (almost) no compute, so what is
measured is the executor's Python work and its p2p messages, at pp = 4, 8, 16 and up to 128 microbatches.

    python packages/pp-sched/benchmarks/bench_overhead.py [--pp 4 8 16 --microbatches 16 32 128]

A stage multiplies a 4-element tensor by one scalar weight. Reported per (schedule, pp, microbatches):
the one-off derivation of the posting plan (``PipelineExecutor.program``, kept for every later step),
the slowest rank's median step time, and that divided by the rank's actions (flat in the microbatch
count when the per-step work is linear in the actions). With ``--torch``, 1F1B is also timed against
``torch.distributed.pipelining``'s ``Schedule1F1B`` on the same stages at each pp (ratio = ours / torch).

With more ranks than cores (16 ranks on a 2-core machine) every message waits for its receiver to get a
core, so the absolute times mostly measure core sharing; the comparison within one pp is what counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from pp_sched import PipelineExecutor, build
from pstate.testing import Harness

SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1), ("zb-v", 2), ("dualpipe-v", 2))


class Scale(nn.Module):
    """An almost free stage: ``x * w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean()


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def timed(step, iters: int) -> float:
    step()  # warm-up (shapes exchanged once)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(slowest(time.perf_counter() - start))
    return statistics.median(times)


def measure(pp: int, microbatches: list[int], iters: int, with_torch: bool, names: list[str]) -> list[dict]:
    rank = dist.get_rank()
    rows = []
    for m in microbatches:
        x = [torch.randn(4) for _ in range(m)]
        y = [torch.randn(4) for _ in range(m)]
        for name, vpp in SCHEDULES:
            if name not in names:
                continue
            schedule = build(name, pp=pp, microbatches=m, vpp=vpp)
            chunks = [Scale() for _ in range(vpp)]
            executor = PipelineExecutor(schedule, chunks, dist.group.WORLD, loss_fn)
            last = schedule.rank_of(schedule.num_stages - 1)
            start = time.perf_counter()
            executor.program(True)
            derive = slowest(time.perf_counter() - start)
            feeds = (x if rank == 0 else None, y if rank == last else None)
            step_s = timed(lambda executor=executor, feeds=feeds: executor.step(*feeds), iters)
            actions = slowest(len(schedule.actions[rank]))
            rows.append({"name": name, "m": m, "derive": derive, "step": step_s, "actions": actions})
        if with_torch:
            stage_module = Scale()
            stage = PipelineStage(stage_module, rank, pp, torch.device("cpu"), group=dist.group.WORLD)
            torch_schedule = Schedule1F1B(stage, m, loss_fn=loss_fn)
            xs, ys = torch.stack(x), torch.stack(y)

            def torch_step(torch_schedule=torch_schedule, xs=xs, ys=ys) -> None:
                if rank == 0:
                    torch_schedule.step(xs)
                elif rank == pp - 1:
                    torch_schedule.step(target=ys, losses=[])
                else:
                    torch_schedule.step()

            ours = PipelineExecutor(build("1f1b", pp=pp, microbatches=m), [Scale()], dist.group.WORLD, loss_fn)
            feeds = (x if rank == 0 else None, y if rank == pp - 1 else None)
            mine = timed(lambda ours=ours, feeds=feeds: ours.step(*feeds), iters)
            theirs = timed(torch_step, iters)
            rows.append({"name": "1f1b vs torch", "m": m, "ours": mine, "torch": theirs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[16, 32, 128])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--schedules", nargs="+", default=[name for name, _ in SCHEDULES], help="which to time")
    parser.add_argument("--torch", action="store_true", help="also time torch's Schedule1F1B on the same stages")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one thread per rank, {args.iters} steps")
    with Harness(timeout_s=3600, threads=1) as harness:
        for pp in args.pp:
            rows = harness.run(pp, measure, pp, args.microbatches, args.iters, args.torch, args.schedules)[0]
            print(f"\npp={pp}")
            print(f"  {'schedule':<17} {'m':>4} {'plan (once)':>12} {'ms/step':>9} {'actions':>8} {'ms/action':>10}")
            for row in rows:
                if row["name"] == "1f1b vs torch":
                    print(
                        f"  1F1B m={row['m']}: ours {row['ours'] * 1e3:.2f} ms/step, torch Schedule1F1B "
                        f"{row['torch'] * 1e3:.2f} ms/step, ratio {row['ours'] / row['torch']:.3f}"
                    )
                    continue
                print(
                    f"  {row['name']:<17} {row['m']:>4} {row['derive'] * 1e3:>9.1f} ms {row['step'] * 1e3:>9.2f} "
                    f"{row['actions']:>8.0f} {row['step'] / row['actions'] * 1e3:>10.3f}"
                )


if __name__ == "__main__":
    main()
