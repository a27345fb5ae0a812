"""A pool of warm rank processes that share one default process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from . import worker
from .errors import RankError, RankTimeout

#: After one rank fails, how long the others get to finish before they are presumed stuck.
FAILURE_GRACE_S = 1.0
#: Outer bound on the wait for stuck ranks' stack dumps; the wait ends as soon as every dump is there.
STACK_DUMP_TIMEOUT_S = 60.0
#: Outer bound on the wait for a rank whose connection closed to exit (its exit code names the failure).
EXIT_WAIT_S = 60.0


def _context() -> multiprocessing.context.BaseContext:
    """Fork workers from a server that has torch imported already: a new pool costs a fork, not an import."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([worker.__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def describe(fn: Callable[..., Any]) -> tuple[str, str | None, str]:
    """(module, module file, qualname) of a module-level function, so a worker can find it."""
    qualname = getattr(fn, "__qualname__", "")
    module_name = getattr(fn, "__module__", None)
    if not callable(fn) or not module_name or not qualname or "<" in qualname:
        raise TypeError(
            f"{fn!r} must be a function defined at module level: nested functions, lambdas and "
            "partials cannot be sent to worker processes (pass their arguments through *args instead)"
        )
    module = sys.modules.get(module_name)
    return module_name, getattr(module, "__file__", None), qualname


class WorkerPool:
    """``world_size`` processes, each a rank of one default group, serving calls until closed."""

    def __init__(self, world_size: int, *, backend: str = "gloo", threads: int = 1, start_timeout_s: float = 300.0):
        self.world_size = world_size
        self.backend = backend
        self.broken = False
        self._tmp = tempfile.mkdtemp(prefix="pstate-ranks-")
        ctx = _context()
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker.main,
                args=(
                    rank,
                    world_size,
                    os.path.join(self._tmp, "store"),
                    backend,
                    child,
                    self._stack_path(rank),
                    threads,
                    start_timeout_s,
                ),
                daemon=True,
                name=f"pstate-rank-{rank}",
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        try:
            self._collect(start_timeout_s, what="start")
        except BaseException:
            self.kill()
            raise

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self._tmp, f"stack-{rank}.txt")

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout_s: float) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if self.broken:
            raise RuntimeError("this pool was killed after a failure; make a new one")
        header = pickle.dumps(describe(fn))
        payload = pickle.dumps((args, kwargs))
        try:
            for conn in self._conns:
                conn.send_bytes(header)
                conn.send_bytes(payload)
            return self._collect(timeout_s, what=getattr(fn, "__qualname__", "call"))
        except BaseException:
            self.kill()
            raise

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        """Wait for one reply per rank. Any failure, death or timeout raises, naming the rank."""
        pending = dict(zip(self._conns, range(self.world_size)))
        results: list[Any] = [None] * self.world_size
        failures: list[tuple[int, str, BaseException | None]] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending), remaining):
                rank = pending.pop(conn)
                try:
                    reply = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self._procs[rank].join(EXIT_WAIT_S)
                    code = self._procs[rank].exitcode
                    failures.append((rank, f"rank {rank} exited (exit code {code}) during {what}", None))
                    continue
                if reply[0] == "error":
                    cause = pickle.loads(reply[2]) if reply[2] is not None else None
                    failures.append((rank, reply[1], cause))
                else:
                    results[rank] = reply[1]
            if failures:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        if not failures and not pending:
            return results
        stuck = sorted(pending.values())
        stacks = self._dump_stacks(stuck)  # the caller kills the pool when this raises
        if failures:
            failures.sort(key=lambda f: f[0])
            rank, text, cause = failures[0]
            others = f"; ranks {', '.join(map(str, stuck))} did not finish:\n{stacks}" if stuck else ""
            more = f" (also failed: ranks {', '.join(str(f[0]) for f in failures[1:])})" if failures[1:] else ""
            message = f"rank {rank} of {self.world_size} failed in {what}{more}:\n{text}{others}"
            raise RankError(message, rank, text) from cause
        message = (
            f"{what} did not finish within {timeout_s:.0f} s on ranks {', '.join(map(str, stuck))} of "
            f"{self.world_size}; the ranks were killed. Their stacks:\n{stacks}"
        )
        raise RankTimeout(message, stuck[0], stacks)

    def _dump_stacks(self, ranks: list[int]) -> str:
        if not ranks:
            return ""
        for rank in ranks:
            if self._procs[rank].is_alive():
                os.kill(self._procs[rank].pid, worker.STACK_SIGNAL)
        texts = {rank: self._read_stack(rank) for rank in ranks}
        deadline = time.monotonic() + STACK_DUMP_TIMEOUT_S
        while time.monotonic() < deadline:
            waiting = [r for r in ranks if self._procs[r].is_alive() and not worker.dump_is_complete(texts[r])]
            if not waiting:
                break
            time.sleep(0.02)
            for rank in waiting:
                texts[rank] = self._read_stack(rank)
        return "\n".join(f"--- rank {rank} ---\n{texts[rank].strip() or '(no stack written)'}" for rank in ranks)

    def _read_stack(self, rank: int) -> str:
        try:
            with open(self._stack_path(rank)) as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop every rank at once, whatever it is doing; the pool cannot be used again."""
        self.broken = True
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            proc.join(5.0)
        self._release()

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the ranks leave the default group cleanly, then end them."""
        if self.broken:
            return
        self.broken = True
        try:
            for conn in self._conns:
                conn.send_bytes(worker.STOP)
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5.0)
        self._release()

    def _release(self) -> None:
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
