"""MoE all-to-all overlap: one training step of a stack of residual MoE sublayers over ``--microbatches``
microbatches, with and without overlapping the all-to-alls, at EP = 2 and 4, on CPU over gloo.

    python packages/moe-dispatch/benchmarks/bench_overlap.py [--tokens 512 --hidden 256 --ffn 512 --experts 8]

Ways (the same ranks, alternating step by step so that all see the same machine load):

- ``plain``: ``stack(x)`` then ``backward()`` per microbatch (synchronous all-to-alls);
- ``off``: the stack cut at its all-to-alls (``StagedRun``) with each all-to-all waited for at once,
  microbatch after microbatch (the breakdown of the plain step);
- ``on``: 1F1B's overlapped order: F0, then F(k+1) interleaved with B(k), then the last B, each
  all-to-all in flight while the other microbatch computes.

Time: the slowest rank's seconds per step, the best of ``--iters`` after one warm-up. Breakdown per rank
of that best step (from :class:`moe_dispatch.OverlapTimes`): compute (in compute pieces),
wait (blocked on an all-to-all), a2a (launch to completion of every all-to-all) and hidden (the part of
a2a that ran while the rank computed something else); hidden / a2a is the share of communication that
the overlap hid. One process and one thread per rank; gloo runs each all-to-all on its own thread.

CPU caveat: overlap needs a core free to move the data while the rank computes. With more threads
than cores (EP=4 on 2 cores, or a machine loaded by other jobs) the communication thread competes with
the compute for the same cores, so hidden time need not turn into a shorter step; the breakdown still
shows how much communication was in flight during compute.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moe_dispatch import MoELayer, OverlapTimes, ResidualMoE, StagedStack, interleave
from moe_dispatch.overlap import run
from pstate.testing import Harness

WAYS = ("plain", "off", "on")


def step(stack: StagedStack, way: str, xs: list[torch.Tensor]) -> None:
    """One step's forwards and backwards of every microbatch, ``way`` as in the module docstring."""
    if way == "plain":
        for x in xs:
            stack(x).square().mean().backward()
        return
    runs = [stack.staged_run() for _ in xs]

    def backward(k: int):
        (y,) = runs[k].outputs
        return runs[k].backward([y.square().mean()], [None])

    if way == "off":
        for k, x in enumerate(xs):
            run(runs[k].forward(x))
            run(backward(k))
        return
    run(runs[0].forward(xs[0]))
    for k in range(1, len(xs)):
        interleave(runs[k].forward(xs[k]), backward(k - 1))
    run(backward(len(xs) - 1))


def measure(tokens: int, hidden: int, ffn: int, experts: int, topk: int, layers: int, m: int, iters: int) -> dict:
    torch.set_num_threads(1)
    rank, group = dist.get_rank(), dist.group.WORLD
    stack = StagedStack(
        [ResidualMoE(MoELayer(hidden, ffn, experts, topk, ep_group=group, seed=i)) for i in range(layers)]
    )
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(tokens, 1, hidden, generator=g) for _ in range(m)]
    best = {way: float("inf") for way in WAYS}
    times: dict[str, dict] = {}
    for i in range(iters + 1):
        for way in WAYS:
            stack.times = OverlapTimes()
            stack.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            step(stack, way, xs)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i and elapsed.item() < best[way]:  # every rank sees the same elapsed: the same step is kept
                best[way], times[way] = elapsed.item(), stack.times.as_dict()
    return {"best": best, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank per microbatch")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.ffn, args.experts, args.topk, args.layers, args.microbatches, args.iters)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, load average {load:.1f}, gloo, 1 thread/rank")
    print(
        f"{args.layers} x ResidualMoE, fp32, {args.microbatches} microbatches x {args.tokens} tokens/rank, hidden "
        f"{args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.topk}"
    )
    with Harness(timeout_s=1800) as harness:
        for ep in args.ep:
            results = harness.run(ep, measure, *shape)
            best = results[0]["best"]
            print(f"\nEP={ep}: s/step plain {best['plain']:.3f}, off {best['off']:.3f}, on {best['on']:.3f} "
                  f"(off/on {best['off'] / best['on']:.2f}x, plain/on {best['plain'] / best['on']:.2f}x)")  # fmt: skip
            print(f"{'rank':>4} {'way':>4} {'compute s':>9} {'wait s':>7} {'a2a s':>7} {'hidden s':>8} {'hidden %':>8}")
            for rank, r in enumerate(results):
                for way in ("off", "on"):
                    t = r["times"][way]
                    share = 100 * t["hidden_s"] / t["a2a_s"] if t["a2a_s"] else 0.0
                    print(
                        f"{rank:>4} {way:>4} {t['compute_s']:>9.3f} {t['wait_s']:>7.3f} {t['a2a_s']:>7.3f} "
                        f"{t['hidden_s']:>8.3f} {share:>8.1f}"
                    )


if __name__ == "__main__":
    main()
