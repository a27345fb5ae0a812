"""``MoELayer`` forward + backward: the all-to-all dispatcher at EP = 2 and 4 against the all-gather
dispatcher and against one process holding all experts, each with the expert loop and with the grouped
GEMM, on CPU over gloo, in one run; then ``GroupedExperts`` alone, loop against grouped GEMM.

    python packages/moe-dispatch/benchmarks/bench_moe.py [--tokens 1024 --hidden 256 --ffn 512 --experts 8 --topk 2]

Weak scaling: every rank routes its own ``--tokens`` tokens, so each EP rank does the expert work of
one rank's batch, like the single process (``single``: EP=1, all experts, one rank's tokens). Time: the
slowest rank's seconds per step, the best of ``--iters`` after one warm-up (the step least disturbed by
other load on a shared machine); ratio = row / single with the same expert path; tokens/s = the tokens
of all ranks per step / time. Bytes: what one rank sends per step (forward + backward), counted from
the routed rows; all-gather and reduce-scatter counted as ring algorithms ((ep-1)/ep of the gathered
tensor). One process and one thread per rank; with more ranks than cores the ranks share cores, so
times show the communication pattern more than a speed-up.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moe_dispatch import GroupedExperts, MoELayer
from pstate.testing import Harness

GEMMS = ("loop", "grouped")
DISPATCHERS = ("alltoall", "allgather")


def measure(dispatcher: str, tokens: int, hidden: int, ffn: int, experts: int, topk: int, iters: int) -> dict:
    """Best seconds per step of the loop and the grouped-GEMM layer (alternating step by step, so both see
    the same machine load) and the bytes this rank sends per step."""
    ep = dist.get_world_size()
    layers = {
        gemm: MoELayer(hidden, ffn, experts, topk, dispatcher=dispatcher, ep_group=dist.group.WORLD, gemm=gemm, seed=0)
        for gemm in GEMMS
    }
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, 1, hidden, generator=generator, requires_grad=True)
    times: dict[str, list[float]] = {gemm: [] for gemm in GEMMS}
    for i in range(iters + 1):
        for gemm, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            layer(x).square().sum().backward()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times[gemm].append(elapsed.item())
    layer = layers["loop"]
    d = layer.dispatcher
    if ep == 1:
        sent = 0.0
    elif dispatcher == "alltoall":
        me = dist.get_rank()
        r = d.routing
        rows = (sum(r.send) - r.send[me]) + (sum(r.recv) - r.recv[me])  # dispatch + combine
        sent = 2 * rows * hidden * 4  # the backward sends the same rows back
    else:
        per_gather = (ep - 1) * tokens * ((hidden + experts) * 4 + experts)  # hidden, probs, map
        per_reduce_scatter = (ep - 1) * tokens * hidden * 4
        sent = per_gather + per_reduce_scatter + (ep - 1) * tokens * (2 * hidden + experts) * 4  # + backward
    total = torch.tensor([sent])
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return {**{gemm: min(t) for gemm, t in times.items()}, "bytes": total.item()}


def measure_experts(rows: int, hidden: int, ffn: int, experts: int, iters: int) -> dict[str, float]:
    """Best seconds per forward + backward of ``experts`` local experts on ``rows`` rows in uneven
    groups, for each expert path; the paths alternate step by step so both see the same machine load."""
    layers = {gemm: GroupedExperts(experts, hidden, ffn, gemm=gemm, seed=0) for gemm in GEMMS}
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(1)) + 0.5
    counts = (weights / weights.sum() * rows).long()
    counts[-1] += rows - counts.sum()
    x = torch.randn(rows, hidden, requires_grad=True)
    times: dict[str, list[float]] = {gemm: [] for gemm in layers}
    for i in range(iters + 1):
        for gemm, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            layer(x, counts).square().sum().backward()
            if i:
                times[gemm].append(time.perf_counter() - start)
    return {gemm: min(t) for gemm, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.ffn, args.experts, args.topk, args.iters)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one process and one thread per rank")
    print(
        f"MoELayer fwd+bwd, fp32, {args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn} (swiglu), "
        f"{args.experts} experts, top-{args.topk}"
    )
    with Harness(timeout_s=1800) as harness:
        single = harness.run(1, measure, "alltoall", *shape)[0]
        print(f"{'dispatcher':<10} {'ep':>3} {'gemm':>8} {'s/step':>8} {'ratio':>6} {'tokens/s':>9} {'MiB/rank':>9}")
        rows = [("single", 1, single)]
        for ep in (2, 4):
            rows += [(dispatcher, ep, harness.run(ep, measure, dispatcher, *shape)[0]) for dispatcher in DISPATCHERS]
        for dispatcher, ep, r in rows:
            for gemm in GEMMS:
                print(
                    f"{dispatcher:<10} {ep:>3} {gemm:>8} {r[gemm]:>8.3f} {r[gemm] / single[gemm]:>6.2f} "
                    f"{args.tokens * ep / r[gemm]:>9.0f} {r['bytes'] / 2**20:>9.2f}"
                )
        print(f"\nGroupedExperts alone, fwd+bwd, {args.tokens * args.topk} rows in uneven groups, one thread:")
        print(f"{'experts':>8} {'loop s':>8} {'grouped s':>10} {'loop/grouped':>13}")
        for experts in (args.experts, 4 * args.experts):
            t = harness.run(
                1, measure_experts, args.tokens * args.topk, args.hidden, args.ffn, experts, 4 * args.iters
            )[0]
            print(f"{experts:>8} {t['loop']:>8.3f} {t['grouped']:>10.3f} {t['loop'] / t['grouped']:>13.2f}")


if __name__ == "__main__":
    main()
