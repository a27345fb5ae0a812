"""Causal attention forward + backward on a long sequence: ring, Ulysses and hierarchical context
parallelism at CP = 2 and 4 against one process doing full attention, and PyTorch's experimental
``context_parallel``, on CPU over gloo, in one run.

    python packages/cp-ring/benchmarks/bench_cp_attention.py [--seq 8192 --heads 8 --head-dim 64 --iters 2]
        [--dtype fp32|bf16] [--methods ring,ring-math,ulysses,hierarchical,torch-cp]

Rows: ``full`` is ``F.scaled_dot_product_attention`` on the whole sequence in one process (PyTorch's CPU
flash kernel); ``ring`` is ``ring_attention`` with its default kernel on CPU, ``SDPAKernel`` (the same
fused kernel per block); ``ring-math`` is the same ring with ``MathKernel`` plugged in through ``kernel=``
(plain matmul + softmax, one fp32 ``[b, h, s/cp, s/cp]`` score block at a time); ``ulysses`` is
``ulysses_attention``; ``hier AxR`` is ``hierarchical_attention`` with all-to-all groups of ``A`` adjacent
ranks and rings of ``R`` (``ps.cp_a2a`` and ``ps.cp_ring`` of ``ParallelConfig(cp=A*R, cp_a2a=A)``; at CP=4
only, as 2x2: at CP=2 it would be plain Ulysses or plain ring). Every CP row is checked against ``full``
(max |diff| of the output and dQ, in the run's dtype) before its times count.

Time: the slowest rank's seconds per step (median of ``--iters`` after one warm-up); ratio = row / full.
Memory: each configuration runs in fresh rank processes; peak MiB = the rank's peak resident set during
the steps minus its resident set just before them (inputs excluded), the largest over ranks. Each rank is
one process with one thread; with more ranks than cores (CP=4 on 2 cores) ranks share cores, so times at
CP=4 show the communication and memory pattern rather than a speed-up.

Bytes: one more step runs under ``pstate.comm``'s recorder; ``MiB sent/rank`` is what each rank sends per
step (forward + backward) on each axis, in the recorder's wire bytes (all-to-all: ``(n-1)/n`` of the
payload; p2p: the payload), the largest over ranks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pstate
from cp_ring import MathKernel, hierarchical_attention, ring_attention, shard_sequence, ulysses_attention
from pstate.comm import CommRecorder
from pstate.testing import Harness

#: The hierarchical split benchmarked at each CP size: (all-to-all group, ring) sizes.
SPLITS = {4: (2, 2)}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def torch_context_parallel(q, k, v, do):
    """PyTorch's experimental ``context_parallel`` on the same inputs; returns its output shard, or raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    q, k, v, do = (t.clone() for t in (q, k, v, do))
    with context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2]):
        for t in (q, k, v):
            t.requires_grad_()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(do)
    return out


def measure(method: str, seq: int, heads: int, head_dim: int, iters: int, dtype: str):
    generator = torch.Generator().manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    q, k, v, do = (torch.randn(1, heads, seq, head_dim, generator=generator).to(dt) for _ in range(4))
    if method == "torch-cp":
        try:
            torch_context_parallel(q, k, v, do)
        except Exception as error:  # report why it does not run here: the first error, not the clean-up's
            while error.__context__ is not None:
                error = error.__context__
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        return {"error": None}
    world = dist.get_world_size()
    a2a = SPLITS[world][0] if method == "hierarchical" else 1
    with pstate.initialize(pstate.ParallelConfig(cp=world, cp_a2a=a2a)) as ps:
        return _measure(ps, method, q, k, v, do, iters)


def _measure(ps, method, q, k, v, do, iters):
    group = ps.cp
    if method != "full":
        q, k, v, do = (shard_sequence(t, group=group, dim=2).contiguous() for t in (q, k, v, do))
    attention = {
        "full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "ring": lambda q, k, v: ring_attention(q, k, v, group=group),
        "ring-math": lambda q, k, v: ring_attention(q, k, v, group=group, kernel=MathKernel()),
        "ulysses": lambda q, k, v: ulysses_attention(q, k, v, group=group),
        "hierarchical": lambda q, k, v: hierarchical_attention(q, k, v, a2a_group=ps.cp_a2a, ring_group=ps.cp_ring),
    }[method]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    before = rss_mib()
    times = []
    for i in range(iters + 1):
        for t in (q, k, v):
            t.grad = None
        dist.barrier()
        start = time.perf_counter()
        out = attention(q, k, v)
        out.backward(do)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:  # the first step is a warm-up
            times.append(elapsed.item())
    peak = torch.tensor([peak_rss_mib() - before])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    with CommRecorder.for_state(ps) as recorder:  # one more step, for the bytes each rank sends
        attention(q, k, v).backward(do)
    sent = recorder.by_axis(ops=[op for op in {r.op for r in recorder.records} if op != "recv"])
    axes = sorted(sent)
    mib = torch.tensor([sent[a]["wire_bytes"] / 2**20 for a in axes], dtype=torch.float64)
    dist.all_reduce(mib, op=dist.ReduceOp.MAX)
    sent = dict(zip(axes, mib.tolist()))
    return {"time": statistics.median(times), "peak": peak.item(), "out": out.detach(), "dq": q.grad, "sent": sent}


def zigzag_part(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    chunks = x.chunk(2 * cp, 2)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--methods", default="ring,ring-math,ulysses,hierarchical,torch-cp", help="comma-separated rows to run"
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    shape = (args.seq, args.heads, args.head_dim, args.iters, args.dtype)
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, gloo, one process and one thread per rank")
    print(
        f"causal attention fwd+bwd, {args.dtype}, batch 1, seq {args.seq}, heads {args.heads}, head_dim {args.head_dim}"
    )

    def fresh(world_size: int, method: str):  # fresh processes: a clean resident-set baseline
        with Harness(timeout_s=1800) as harness:
            return harness.run(world_size, measure, method, *shape)

    full = fresh(1, "full")[0]
    header = ("method", "cp", "s/step", "ratio", "peak MiB/rank", "max|d out|", "max|d dQ|", "MiB sent/rank")
    print("{:<11} {:>3} {:>8} {:>7} {:>14} {:>11} {:>10}  {}".format(*header))
    print(f"{'full':<11} {1:>3} {full['time']:>8.2f} {1.0:>7.2f} {full['peak']:>14.0f} {'-':>11} {'-':>10}  -")
    for cp in (2, 4):
        for method in (m for m in ("ring", "ring-math", "ulysses", "hierarchical") if m in methods):
            if method == "hierarchical" and cp not in SPLITS:
                continue
            results = fresh(cp, method)
            d_out, d_dq = (
                max((r[key] - zigzag_part(full[key], i, cp)).float().abs().max().item() for i, r in enumerate(results))
                for key in ("out", "dq")
            )
            r = results[0]
            name = f"hier {'x'.join(map(str, SPLITS[cp]))}" if method == "hierarchical" else method
            sent = ", ".join(f"{axis} {mib:.1f}" for axis, mib in r["sent"].items())
            sent += f" (total {sum(r['sent'].values()):.1f})" if len(r["sent"]) > 1 else ""
            print(
                f"{name:<11} {cp:>3} {r['time']:>8.2f} {r['time'] / full['time']:>7.2f} {r['peak']:>14.0f} "
                f"{d_out:>11.1e} {d_dq:>10.1e}  {sent}"
            )
    if "torch-cp" not in methods:
        return
    error = fresh(2, "torch-cp")[0]["error"]
    print(f"torch context_parallel (cp=2): {'runs' if error is None else 'does not run on CPU/gloo: ' + error}")


if __name__ == "__main__":
    main()
