"""One training step of a pipelined MLP stack: ``pp_sched``'s executor running ``build("1f1b")`` against
``torch.distributed.pipelining``'s ``Schedule1F1B`` with ``PipelineStage``, on the same model, weights and
microbatches, at pp = 2 and 4, on CPU over gloo with one thread per rank, in one run.

    python packages/pp-sched/benchmarks/bench_1f1b.py [--hidden 512 --layers 8 --rows 64 --microbatches 8]

Both versions start from the same weights; their losses and gradients after one step are compared before
timing. A measurement is the slowest rank's time for ``--iters`` steps; the versions alternate over
``--rounds`` rounds and the median is reported. ratio = ours / torch (below 1.0: ours is faster).

Idle fraction per rank: ``1 - compute / step wall time`` measured by the executor (compute = forward,
loss and backward), next to ``simulate``'s prediction with the measured forward and backward times of
a stage (no communication cost). With more ranks than cores, the ranks also wait for a core.
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
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from pp_sched import PipelineExecutor, build, simulate, split_layers
from pp_sched.split_backward import SavedTensors, input_backward
from pstate.testing import Harness


def stage_module(rank: int, pp: int, layers: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)  # every rank builds all layers, so layer i is the same wherever it lives
    all_layers = [nn.Linear(hidden, hidden) for _ in range(layers)]
    mine = split_layers(layers, pp=pp)[rank].layers
    return nn.Sequential(*[m for i in mine for m in (all_layers[i], nn.Tanh())])


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def stage_costs(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one forward and one backward of ``module`` on ``x``."""
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = module(x.detach().clone().requires_grad_())
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    module.zero_grad(set_to_none=True)
    return statistics.median(forward), statistics.median(backward)


def split_costs(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[float, float, float]:
    """Median seconds of one full backward (B), and of the input-gradient (I) and weight (W) passes."""
    full, inputs, weights = [], [], []
    for _ in range(repeats):
        leaf = x.detach().clone().requires_grad_()
        out = module(leaf)
        start = time.perf_counter()
        out.backward(torch.ones_like(out))
        full.append(time.perf_counter() - start)
        leaf = x.detach().clone().requires_grad_()
        saved = SavedTensors()
        with saved.recording():
            out = module(leaf)
        start = time.perf_counter()
        _, weight = input_backward([out], [torch.ones_like(out)], [leaf], saved)
        middle = time.perf_counter()
        weight.run()
        inputs.append(middle - start)
        weights.append(time.perf_counter() - middle)
    module.zero_grad(set_to_none=True)
    return statistics.median(full), statistics.median(inputs), statistics.median(weights)


def measure(pp: int, hidden: int, layers: int, rows: int, microbatches: int, iters: int, rounds: int) -> dict:
    rank, last = dist.get_rank(), pp - 1
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(microbatches * rows, hidden, generator=generator)
    y = torch.randn(microbatches * rows, hidden, generator=generator)
    schedule = build("1f1b", pp=pp, microbatches=microbatches)
    mine = stage_module(rank, pp, layers, hidden)
    theirs = copy.deepcopy(mine)
    split = copy.deepcopy(mine)
    executor = PipelineExecutor(schedule, [mine], dist.group.WORLD, loss_fn)
    zero_bubble = PipelineExecutor(
        build("zero-bubble", pp=pp, microbatches=microbatches), [split], dist.group.WORLD, loss_fn
    )
    stage = PipelineStage(theirs, rank, pp, torch.device("cpu"), group=dist.group.WORLD)
    torch_schedule = Schedule1F1B(stage, microbatches, loss_fn=loss_fn)
    results: list = []

    def ours() -> None:
        results.append(executor.step(list(x.chunk(microbatches)) if rank == 0 else None, y.chunk(microbatches)))

    def zb_step() -> None:
        results.append(zero_bubble.step(list(x.chunk(microbatches)) if rank == 0 else None, y.chunk(microbatches)))

    def torch_step() -> None:
        losses: list = []
        if rank == 0:
            torch_schedule.step(x)
        elif rank == last:
            torch_schedule.step(target=y, losses=losses)
        else:
            torch_schedule.step()
        results.append(losses)

    ours()
    torch_step()
    zb_step()
    our_losses, torch_losses = results[0].losses, results[1]
    difference = max(
        max((a.grad - b.grad).abs().max().item(), (a.grad - c.grad).abs().max().item())
        for a, b, c in zip(mine.parameters(), theirs.parameters(), split.parameters())
    )
    if rank == last:
        difference = max(difference, max((a - b).abs().item() for a, b in zip(our_losses, torch_losses)))
    times: dict[str, list[float]] = {"ours": [], "torch": [], "zero-bubble": []}
    idle: list[float] = []
    for _ in range(rounds):
        for name, step, module in (
            ("ours", ours, mine),
            ("torch", torch_step, theirs),
            ("zero-bubble", zb_step, split),
        ):
            step()  # warm-up
            dist.barrier()
            results.clear()
            start = time.perf_counter()
            for _ in range(iters):
                module.zero_grad(set_to_none=True)
                step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed.item() / iters)
            if name == "ours":
                idle += [1 - r.compute_s / r.wall_s for r in results]
    forward, backward = stage_costs(mine, x.chunk(microbatches)[0])
    full, input_pass, weight_pass = split_costs(mine, x.chunk(microbatches)[0])
    return {
        "split": (full, input_pass, weight_pass),
        "difference": difference,
        "times": {name: statistics.median(t) for name, t in times.items()},
        "idle": statistics.median(idle),
        "forward": forward,
        "backward": backward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="rows per microbatch")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one thread per rank")
    print(
        f"{args.layers} x Linear({args.hidden}, {args.hidden}) + tanh, {args.microbatches} microbatches of "
        f"{args.rows} rows, {args.iters} steps x {args.rounds} rounds"
    )
    with Harness(timeout_s=1800, threads=1) as harness:
        for pp in (2, 4):
            shape = (args.hidden, args.layers, args.rows, args.microbatches, args.iters, args.rounds)
            ranks = harness.run(pp, measure, pp, *shape)
            ours, theirs = (max(r["times"][name] for r in ranks) for name in ("ours", "torch"))
            forward = statistics.mean(r["forward"] for r in ranks)
            backward = statistics.mean(r["backward"] for r in ranks)
            predicted = simulate(build("1f1b", pp=pp, microbatches=args.microbatches), forward, backward)
            difference = max(r["difference"] for r in ranks)
            print(
                f"\npp={pp}: ours {ours * 1e3:.2f} ms/step, torch Schedule1F1B {theirs * 1e3:.2f} ms/step, "
                f"ratio {ours / theirs:.3f}; max |difference| of losses and grads after one step {difference:.2e}"
            )
            print(f"  stage forward {forward * 1e3:.2f} ms, backward {backward * 1e3:.2f} ms per microbatch")
            full, i_s, w_s = (statistics.mean(r["split"][j] for r in ranks) for j in range(3))
            zb = max(r["times"]["zero-bubble"] for r in ranks)
            zb_sim = simulate(build("zero-bubble", pp=pp, microbatches=args.microbatches), forward, i_s + w_s, w_s)
            print(
                f"  split backward: B {full * 1e3:.2f} ms, I {i_s * 1e3:.2f} + W {w_s * 1e3:.2f} = "
                f"{(i_s + w_s) * 1e3:.2f} ms ({(i_s + w_s) / full:.2f} x B)"
            )
            print(
                f"  zero-bubble {zb * 1e3:.2f} ms/step, {zb / ours:.3f} x 1F1B; simulated bubble "
                f"{zb_sim.bubble_fraction:.1%} vs 1F1B {predicted.bubble_fraction:.1%}"
            )
            print("  rank  idle measured  idle simulated")
            for rank, r in enumerate(ranks):
                print(f"  {rank:>4}  {r['idle']:>13.1%}  {predicted.idle_fractions[rank]:>14.1%}")


if __name__ == "__main__":
    main()
