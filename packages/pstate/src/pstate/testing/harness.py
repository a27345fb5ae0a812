"""``Harness``: run a function on N ranks, reusing warm pools across calls."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..device import backend_for
from .pool import WorkerPool


class Harness:
    """Runs module-level functions on N ranks as N processes and returns each rank's result.

    One warm :class:`WorkerPool` is kept per (world size, device) and reused, so a call costs a message
    round trip instead of starting processes and importing torch. A pool is replaced after any failure.
    At most ``max_warm_ranks`` processes stay warm; the least recently used pools are closed first.
    """

    def __init__(self, *, timeout_s: float = 300.0, threads: int = 1, max_warm_ranks: int = 16):
        self.timeout_s = timeout_s
        self.threads = threads
        self.max_warm_ranks = max_warm_ranks
        self._pools: OrderedDict[tuple[int, str], WorkerPool] = OrderedDict()

    def run(
        self,
        world_size: int,
        fn: Callable[..., Any],
        *args: Any,
        device: str = "cpu",
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks (gloo on ``device="cpu"``, NCCL on
        ``"cuda"``); return the results in rank order. Each rank finds its rank and the default group
        through ``torch.distributed``. A failure raises :class:`RankError` naming the rank, with its
        traceback; a hang raises :class:`RankTimeout` with every stuck rank's stack."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
        pool = self._pool(world_size, device)
        return pool.run(fn, args, kwargs, self.timeout_s if timeout_s is None else timeout_s)

    def _pool(self, world_size: int, device: str) -> WorkerPool:
        key = (world_size, device)
        pool = self._pools.get(key)
        if pool is not None and not pool.broken:
            self._pools.move_to_end(key)
            return pool
        self._pools.pop(key, None)
        while self._pools and sum(p.world_size for p in self._pools.values()) + world_size > self.max_warm_ranks:
            self._pools.popitem(last=False)[1].close()
        pool = WorkerPool(world_size, backend=backend_for(device), threads=self.threads, start_timeout_s=self.timeout_s)
        self._pools[key] = pool
        return pool

    def close(self) -> None:
        """End every warm pool."""
        while self._pools:
            self._pools.popitem()[1].close()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """One-off form of :meth:`Harness.run`: starts ranks, runs ``fn``, ends them (no reuse)."""
    with Harness() as harness:
        return harness.run(world_size, fn, *args, **kwargs)
