"""``MoELayer`` forward + backward: the all-to-all dispatcher at EP = 2 and 4 against the all-gather
dispatcher and against one process holding all experts, on CPU over gloo, in one run.

    python packages/moe-dispatch/benchmarks/bench_moe.py [--tokens 1024 --hidden 256 --ffn 512 --experts 8 --topk 2]

Weak scaling: every rank routes its own ``--tokens`` tokens, so each EP rank does the expert work of
one rank's batch, like the single process (``single``: EP=1, all experts, one rank's tokens). Time: the
slowest rank's seconds per step, median of ``--iters`` after one warm-up; ratio = row / single.
Bytes: what one rank sends per step (forward + backward), counted from the routed rows; all-gather and
reduce-scatter counted as ring algorithms ((ep-1)/ep of the gathered tensor). One process and one thread
per rank; with more ranks than cores the ranks share cores, so times show the communication pattern
more than a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from moe_dispatch import MoELayer
from pstate.testing import Harness


def measure(dispatcher: str, tokens: int, hidden: int, ffn: int, experts: int, topk: int, iters: int) -> dict:
    ep = dist.get_world_size()
    layer = MoELayer(hidden, ffn, experts, topk, dispatcher=dispatcher, ep_group=dist.group.WORLD, seed=0)
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, 1, hidden, generator=generator, requires_grad=True)
    times = []
    for i in range(iters + 1):
        layer.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        layer(x).square().sum().backward()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:
            times.append(elapsed.item())
    d = layer.dispatcher
    if ep == 1:
        sent = 0.0
    elif dispatcher == "alltoall":
        me = dist.get_rank()
        rows = (sum(d._send) - d._send[me]) + (sum(d._recv) - d._recv[me])  # dispatch + combine
        sent = 2 * rows * hidden * 4  # the backward sends the same rows back
    else:
        per_gather = (ep - 1) * tokens * ((hidden + experts) * 4 + experts)  # hidden, probs, map
        per_reduce_scatter = (ep - 1) * tokens * hidden * 4
        sent = per_gather + per_reduce_scatter + (ep - 1) * tokens * (2 * hidden + experts) * 4  # + backward
    total = torch.tensor([sent])
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return {"time": statistics.median(times), "bytes": total.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.ffn, args.experts, args.topk, args.iters)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one process and one thread per rank")
    print(
        f"MoELayer fwd+bwd, fp32, {args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn} (swiglu), "
        f"{args.experts} experts, top-{args.topk}"
    )
    with Harness(timeout_s=1800) as harness:
        single = harness.run(1, measure, "alltoall", *shape)[0]
        print(f"{'dispatcher':<10} {'ep':>3} {'s/step':>8} {'ratio':>6} {'MiB sent/rank':>14}")
        print(f"{'single':<10} {1:>3} {single['time']:>8.3f} {1.0:>6.2f} {0.0:>14.2f}")
        for ep in (2, 4):
            for dispatcher in ("alltoall", "allgather"):
                r = harness.run(ep, measure, dispatcher, *shape)[0]
                print(
                    f"{dispatcher:<10} {ep:>3} {r['time']:>8.3f} {r['time'] / single['time']:>6.2f} "
                    f"{r['bytes'] / 2**20:>14.2f}"
                )


if __name__ == "__main__":
    main()
