"""One training step of a pipelined MLP stack under every schedule, against ``torch.distributed.pipelining``
on the same stages: ``build("1f1b")`` against ``Schedule1F1B`` and ``build("zb-v")`` against
``ScheduleZBVZeroBubble``, and the measured against the simulated bubble of 1F1B, interleaved 1F1B, ZB-H1,
ZB-V and DualPipe-V, at pp = 2 and 4, on CPU over gloo with one thread per rank, in one run.

    python packages/pp-sched/benchmarks/bench_schedules.py [--hidden 512 --layers 8 --rows 64 --microbatches 8]

Every version starts from the same weights; the losses and gradients of ours and torch's after one step
are compared before timing. A measurement is the slowest rank's time for ``--iters`` steps; all versions
alternate within each of ``--rounds`` rounds (A B C ... A B C ...) and the median is reported.
ratio = ours / torch (below 1.0: ours is faster). Next to the wall time, the CPU time of a step summed over
the ranks' processes (``time.process_time``, gloo's threads included): it counts the work done, not the
waits, so it moves much less with the load of a shared machine.

Bubble: ``simulate`` with the forward, full backward (B), input-gradient (I) and weight (W) times of one
layer measured on 1F1B's stage (median over the ranks), times the layers of a chunk (no communication
cost), against the measured idle fraction ``1 - compute / step
wall time`` of the executor (compute = forward, loss and backward), averaged over the ranks. With more
ranks than cores (pp=4 on a 2-core machine) the measured idle time also holds the time a rank waits for a
core, and every message waits for its receiver to be scheduled.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleZBVZeroBubble

from pp_sched import PipelineExecutor, build, simulate, split_layers
from pp_sched.split_backward import SavedTensors, input_backward
from pstate.testing import Harness

SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1), ("zb-v", 2), ("dualpipe-v", 2))
SPLIT = ("zero-bubble", "zb-v", "dualpipe-v")


def chunk_modules(rank: int, pp: int, vpp: int, layout: str, layers: int, hidden: int) -> list[nn.Module]:
    """This rank's chunks, in chunk order: its stages' layers (each ``Linear`` followed by ``tanh``)."""
    torch.manual_seed(0)  # every rank builds all layers, so layer i is the same wherever it lives
    all_layers = [nn.Linear(hidden, hidden) for _ in range(layers)]
    mine = sorted((s for s in split_layers(layers, pp=pp, vpp=vpp, layout=layout) if s.rank == rank), key=_chunk)
    return [nn.Sequential(*[m for i in s.layers for m in (all_layers[i], nn.Tanh())]) for s in mine]


def _chunk(stage) -> int:
    return stage.chunk


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def chunk_costs(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one forward (F), full backward (B), input-gradient (I) and weight (W) pass."""
    times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
    for _ in range(repeats):
        start = time.perf_counter()
        out = module(x.detach().clone().requires_grad_())
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        times["F"].append(middle - start)
        times["B"].append(time.perf_counter() - middle)
        leaf = x.detach().clone().requires_grad_()
        saved = SavedTensors()
        with saved.recording():
            out = module(leaf)
        start = time.perf_counter()
        _, weight = input_backward([out], [torch.ones_like(out)], [leaf], saved)
        middle = time.perf_counter()
        weight.run()
        times["I"].append(middle - start)
        times["W"].append(time.perf_counter() - middle)
    module.zero_grad(set_to_none=True)
    return {kind: statistics.median(t) for kind, t in times.items()}


def torch_version(name: str, chunks: list[nn.Module], rank: int, pp: int, microbatches: int):
    """torch's schedule over copies of ``chunks`` (the same stages), or None when torch has none."""
    if name == "1f1b":
        stage = PipelineStage(chunks[0], rank, pp, torch.device("cpu"), group=dist.group.WORLD)
        return Schedule1F1B(stage, microbatches, loss_fn=loss_fn), rank == 0, rank == pp - 1
    if name == "zb-v":
        stages = [
            PipelineStage(chunk, index, 2 * pp, torch.device("cpu"), group=dist.group.WORLD)
            for chunk, index in zip(chunks, (rank, 2 * pp - 1 - rank))
        ]
        return ScheduleZBVZeroBubble(stages, microbatches, loss_fn=loss_fn), rank == 0, rank == 0
    return None


def measure(pp: int, hidden: int, layers: int, rows: int, microbatches: int, iters: int, rounds: int) -> dict:
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(microbatches * rows, hidden, generator=generator)
    y = torch.randn(microbatches * rows, hidden, generator=generator)
    xs, ys = list(x.chunk(microbatches)), list(y.chunk(microbatches))
    versions, modules, schedules, results, difference = {}, {}, {}, [], 0.0
    for name, vpp in SCHEDULES:
        schedule = build(name, pp=pp, microbatches=microbatches, vpp=vpp)
        chunks = chunk_modules(rank, pp, vpp, schedule.layout, layers, hidden)
        executor = PipelineExecutor(schedule, chunks, dist.group.WORLD, loss_fn)
        first, last = schedule.rank_of(0) == rank, schedule.rank_of(schedule.num_stages - 1) == rank
        feeds = (xs if first else None, ys if last else None)
        versions[name] = lambda executor=executor, feeds=feeds: results.append(executor.step(*feeds))
        modules[name], schedules[name] = chunks, schedule
        theirs = copy.deepcopy(chunks)
        made = torch_version(name, theirs, rank, pp, microbatches)
        if made is None:
            continue
        torch_schedule, first, last = made

        def torch_step(torch_schedule=torch_schedule, first=first, last=last) -> None:
            kwargs = {"target": y, "losses": []} if last else {}
            torch_schedule.step(*([x] if first else []), **kwargs)

        versions[name + " torch"], modules[name + " torch"] = torch_step, theirs
        versions[name]()
        torch_step()
        difference = max(
            difference,
            max(
                (a.grad - b.grad).abs().max().item()
                for c, d in zip(chunks, theirs)
                for a, b in zip(c.parameters(), d.parameters())
            ),
        )
        for module in chunks + theirs:
            module.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name in versions}
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    idle: dict[str, list[float]] = {name: [] for name in schedules}
    for _ in range(rounds):
        for name, step in versions.items():
            step()  # warm-up
            dist.barrier()
            results.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(iters):
                for module in modules[name]:
                    module.zero_grad(set_to_none=True)
                step()
            elapsed = torch.tensor([time.perf_counter() - start])
            used = torch.tensor([time.process_time() - cpu_start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(used)
            times[name].append(elapsed.item() / iters)
            cpu[name].append(used.item() / iters)
            if name in idle:
                idle[name] += [1 - r.compute_s / r.wall_s for r in results]
    costs = chunk_costs(modules["1f1b"][0], xs[0], repeats=9)
    per_layer = len(modules["1f1b"][0]) // 2  # Linear + Tanh per layer
    return {
        "difference": difference,
        "times": {name: statistics.median(t) for name, t in times.items()},
        "cpu": {name: statistics.median(t) for name, t in cpu.items()},
        "idle": {name: statistics.median(v) for name, v in idle.items()},
        "costs": {kind: seconds / per_layer for kind, seconds in costs.items()},
    }


def simulated_bubble(name: str, pp: int, microbatches: int, vpp: int, layers: int, per_layer: dict) -> float:
    schedule = build(name, pp=pp, microbatches=microbatches, vpp=vpp)
    costs = {kind: seconds * layers / (pp * vpp) for kind, seconds in per_layer.items()}
    if name in SPLIT:
        return simulate(schedule, costs["F"], costs["I"] + costs["W"], costs["W"]).bubble_fraction
    return simulate(schedule, costs["F"], costs["B"]).bubble_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="rows per microbatch")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one thread per rank")
    print(
        f"{args.layers} x Linear({args.hidden}, {args.hidden}) + tanh, {args.microbatches} microbatches of "
        f"{args.rows} rows, {args.iters} steps x {args.rounds} rounds"
    )
    with Harness(timeout_s=3600, threads=1) as harness:
        for pp in args.pp:
            shape = (args.hidden, args.layers, args.rows, args.microbatches, args.iters, args.rounds)
            ranks = harness.run(pp, measure, pp, *shape)
            difference = max(r["difference"] for r in ranks)
            sharing = f" ({pp} ranks on {os.cpu_count()} cores: measured idle includes core sharing)"
            print(f"\npp={pp}{sharing if pp > (os.cpu_count() or 1) else ''}")
            print(f"  {'schedule':<17} {'ms/step':>9} {'CPU ms':>8} {'bubble simulated':>17} {'idle measured':>14}")
            per_layer = {k: statistics.median(r["costs"][k] for r in ranks) for k in "FBIW"}
            for name, vpp in SCHEDULES:
                step, used = ranks[0]["times"][name], ranks[0]["cpu"][name]
                bubble = simulated_bubble(name, pp, args.microbatches, vpp, args.layers, per_layer)
                idle = statistics.mean(r["idle"][name] for r in ranks)
                print(f"  {name:<17} {step * 1e3:>9.2f} {used * 1e3:>8.2f} {bubble:>17.1%} {idle:>14.1%}")
            for name, theirs in (("1f1b", "Schedule1F1B"), ("zb-v", "ScheduleZBVZeroBubble")):
                ours, torch_s = (ranks[0]["times"][key] for key in (name, name + " torch"))
                ours_cpu, torch_cpu = (ranks[0]["cpu"][key] for key in (name, name + " torch"))
                print(
                    f"  {name} ours {ours * 1e3:.2f} ms/step, torch {theirs} {torch_s * 1e3:.2f} ms/step, "
                    f"ratio {ours / torch_s:.3f}; CPU {ours_cpu * 1e3:.2f} / {torch_cpu * 1e3:.2f} ms, "
                    f"ratio {ours_cpu / torch_cpu:.3f}"
                )
            print(
                f"  one layer per microbatch: F {per_layer['F'] * 1e3:.2f} ms, B {per_layer['B'] * 1e3:.2f} ms, "
                f"I {per_layer['I'] * 1e3:.2f} + W {per_layer['W'] * 1e3:.2f} ms; max |difference| of gradients "
                f"against torch after one step {difference:.2e}"
            )


if __name__ == "__main__":
    main()
