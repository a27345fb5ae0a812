"""Save/load throughput of ``ckpt`` at world 4 (spawned gloo ranks) against ``torch.save`` from one rank.

The state is a TP-sharded model (each rank holds 1/world of every weight) plus Adam-like moments, in
fp32, ``--mb`` MB in all. Reported, per operation: seconds (slowest rank), MB/s per rank and in
total. For ``AsyncSaver``: how long the loop is blocked (the call) and how long until the write is
committed. ``torch.save``/``torch.load(weights_only=True)`` write/read the same global state from
rank 0. Run: ``python packages/ckpt/benchmarks/bench_ckpt.py --mb 256 --dir /tmp/ckpt-bench``.
Figures on a shared machine are noisy; every save fsyncs, so they include the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ckpt
from pstate import Shard
from pstate.testing import run

LAYERS = 8


def shapes(total_mb: int, world: int) -> tuple[int, int]:
    """``[rows, cols]`` of each of the ``3 * LAYERS`` weights (weight, exp_avg, exp_avg_sq) for ``total_mb``."""
    per_tensor = total_mb * 2**20 // (3 * LAYERS * 4)
    cols = 1024
    rows = max(world, per_tensor // cols // world * world)
    return rows, cols


def rank_state(rank: int, world: int, total_mb: int) -> dict:
    rows, cols = shapes(total_mb, world)
    part = rows // world
    gen = torch.Generator().manual_seed(rank)
    state: dict = {"model": {}, "optim": {}, "step": 10, "rng": ckpt.PerRank(torch.get_rng_state())}
    for i in range(LAYERS):
        for group, name in (("model", "w"), ("optim", "exp_avg"), ("optim", "exp_avg_sq")):
            data = torch.randn(part, cols, generator=gen)
            state[group][f"{i}.{name}"] = Shard(data, (rows, cols), (rank * part, 0))
    return state


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def bench_rank(root: str, total_mb: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    state = rank_state(rank, world, total_mb)
    root_path = Path(root)
    out = {}
    out["save"] = timed(lambda: ckpt.save(state, root_path / "sync"))
    target = rank_state(rank, world, total_mb)
    out["load"] = timed(lambda: ckpt.load(target, root_path / "sync"))
    assert all(torch.equal(state["model"][k].data, target["model"][k].data) for k in state["model"])
    saver = ckpt.AsyncSaver()
    dist.barrier()
    start = time.perf_counter()
    handle = saver.save(state, root_path / "async")
    out["async_blocked"] = time.perf_counter() - start
    handle.wait()
    dist.barrier()
    out["async_total"] = time.perf_counter() - start
    saver.close()
    if rank == 0:  # the baseline: the same global state, one file, from one rank
        full = {}
        for group in ("model", "optim"):
            for key, shard in state[group].items():
                full[f"{group}.{key}"] = torch.empty(shard.global_shape)
        start = time.perf_counter()
        with open(root_path / "torch.pt", "wb") as f:
            torch.save(full, f)
            f.flush()
            os.fsync(f.fileno())
        out["torch_save"] = time.perf_counter() - start
        start = time.perf_counter()
        torch.load(root_path / "torch.pt", weights_only=True)
        out["torch_load"] = time.perf_counter() - start
    dist.barrier()
    out["bytes"] = sum(s.data.numel() * 4 for g in ("model", "optim") for s in state[g].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="total state size in MB")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--dir", default="/tmp/ckpt-bench")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    try:
        results = run(args.world, bench_rank, args.dir, args.mb)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    per_rank_mb = max(r["bytes"] for r in results) / 2**20
    total_mb = sum(r["bytes"] for r in results) / 2**20
    print(f"state: {total_mb:.0f} MB in all, {per_rank_mb:.0f} MB per rank, world {args.world}, fp32")
    print(f"{'operation':<28} {'seconds':>8} {'MB/s per rank':>14} {'MB/s total':>11}")
    for op, label in (("save", "ckpt.save (sync)"), ("load", "ckpt.load"), ("async_total", "AsyncSaver (to commit)")):
        t = max(r[op] for r in results)
        print(f"{label:<28} {t:8.2f} {per_rank_mb / t:14.0f} {total_mb / t:11.0f}")
    blocked = max(r["async_blocked"] for r in results)
    print(f"{'AsyncSaver: loop blocked':<28} {blocked:8.2f}")
    for op, label in (("torch_save", "torch.save, one rank"), ("torch_load", "torch.load, one rank")):
        t = results[0][op]
        print(f"{label:<28} {t:8.2f} {total_mb / t:14.0f} {total_mb / t:11.0f}")


if __name__ == "__main__":
    main()
