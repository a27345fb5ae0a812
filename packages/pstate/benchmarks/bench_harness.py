"""Overhead of the multi-rank harness: an empty call on warm ranks, a new pool, and the cost it saves.

    python packages/pstate/benchmarks/bench_harness.py

"cold" is what a test pays without warm workers: ``torch.multiprocessing.spawn`` starting N fresh
interpreters that import torch and join a gloo group, for every test.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from pstate.testing import Harness

CALLS = 50


def empty() -> int:
    return dist.get_rank()


def _cold_rank(rank: int, world: int, path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(path, world), rank=rank, world_size=world)
    dist.barrier()
    dist.destroy_process_group()


def cold(world: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        mp.spawn(_cold_rank, args=(world, os.path.join(tmp, "store")), nprocs=world)
        return time.perf_counter() - start


def main() -> None:
    worlds = [int(w) for w in sys.argv[1:]] or [2, 4, 8]
    print(f"cores: {os.cpu_count()}")
    with Harness(max_warm_ranks=sum(worlds)) as harness:
        start = time.perf_counter()
        harness.run(1, empty)
        print(f"fork server start (imports torch once) + 1-rank pool: {time.perf_counter() - start:.2f} s")
        for world in worlds:
            start = time.perf_counter()
            harness.run(world, empty)
            first = time.perf_counter() - start
            times = []
            for _ in range(CALLS):
                start = time.perf_counter()
                harness.run(world, empty)
                times.append(time.perf_counter() - start)
            print(
                f"world {world}: new pool {1e3 * first:7.1f} ms | warm empty call median "
                f"{1e3 * statistics.median(times):6.2f} ms, max {1e3 * max(times):6.2f} ms ({CALLS} calls)"
            )
    for world in worlds:
        print(f"world {world}: cold mp.spawn + gloo init per test: {cold(world):6.2f} s")


if __name__ == "__main__":
    main()
