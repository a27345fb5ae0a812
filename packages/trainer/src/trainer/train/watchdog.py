"""Stall detection: every rank reports progress; when one makes none for ``stall_timeout`` seconds, every
rank dumps its stack and the job stops, naming the stalled rank(s).

Each rank runs a thread that, every few seconds, publishes two counters in the job's key-value store
(the launcher's, or torchrun's): ``alive`` (advanced by the thread itself: the process runs) and
``progress`` (advanced by the training loop at each step). It reads every rank's counters and notes, on its
own clock, when each last changed, so no clocks need agree. A rank whose progress has not changed for the
timeout stalls the job. The verdict names the ranks whose ``alive`` counter stopped too (a stopped or frozen
process) or, when all are alive, those whose progress is lowest (the ones the others wait for), and goes
into the store, so every rank dumps its stack to stderr and exits with :data:`trainer.exits.STALLED`.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import TextIO

import torch.distributed as dist

from ..config import TrainConfig
from ..exits import STALLED

VERDICT = "verdict"
#: collectives time out this much later than the watchdog fires (they are the backstop)
COLLECTIVE_MARGIN_S = 60.0


def collective_timeout(train: TrainConfig) -> timedelta:
    """The process groups' timeout: a collective waiting longer fails, after the watchdog had its turn."""
    return timedelta(seconds=train.stall_timeout + COLLECTIVE_MARGIN_S)


class Watchdog:
    """Watches the progress of ``world`` ranks through ``store``; ``beat()`` reports this rank's progress."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        timeout: float,
        *,
        stream: TextIO = sys.stderr,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.interval = min(5.0, timeout / 5)
        self.stream = stream
        self.on_stall = on_stall or self._exit
        self.progress = 0
        self._alive = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trainer-watchdog", daemon=True)
        self._seen: dict[int, tuple[str, float, str, float]] = {}

    def beat(self) -> None:
        """This rank made progress (called by the training loop)."""
        self.progress += 1

    def start(self) -> Watchdog:
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _publish(self) -> None:
        self._alive += 1
        self.store.set(str(self.rank), f"{self._alive} {self.progress}")

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._done.wait(self.interval):
            try:
                self._publish()
                verdict = self._verdict(started)
            except Exception as error:  # the store does not answer: its host is stopped or gone
                verdict = f"the job's store does not answer ({type(error).__name__}: {error})"
            if verdict is not None and not self._done.is_set():
                self.on_stall(verdict)
                return

    def _verdict(self, started: float) -> str | None:
        """The stall message when the job is stalled (decided here, or already by another rank)."""
        if self.store.check([VERDICT]):
            return self.store.get(VERDICT).decode()
        now = time.monotonic()
        keys = [str(r) for r in range(self.world)]
        present = [r for r in range(self.world) if self.store.check([keys[r]])]
        values = dict(zip(present, (v.decode().split() for v in self.store.multi_get([keys[r] for r in present]))))
        for r in range(self.world):
            alive, progress = values.get(r, ("-", "-"))
            old = self._seen.get(r, ("?", started, "?", started))
            self._seen[r] = (
                alive, old[1] if alive == old[0] else now, progress, old[3] if progress == old[2] else now
            )  # fmt: skip
        stalled = [r for r, (_, _, _, since) in self._seen.items() if now - since >= self.timeout]
        if not stalled:
            return None
        frozen = [
            r for r, (_, since, _, _) in self._seen.items() if now - since >= min(self.timeout, 4 * self.interval)
        ]
        late = [r for r, (_, since, _, _) in self._seen.items() if now - since >= 2 * self.interval]
        if frozen:
            names, why = frozen, "stopped responding (process stopped, frozen or gone)"
        elif late:  # a heartbeat is late: wait until that rank beats again or counts as frozen
            return None
        else:
            lowest = min(int(v[1]) for v in values.values()) if values else 0
            names = [r for r in stalled if r not in values or int(values[r][1]) == lowest]
            why = "made no progress (every rank is alive; these are the furthest behind)"
        verdict = (
            f"stalled: rank(s) {names} {why}; no progress for {self.timeout:g} s (train.stall_timeout); "
            "every rank dumps its stack to the log"
        )
        self.store.set(VERDICT, verdict)
        return verdict

    def _exit(self, verdict: str) -> None:
        """Dump this rank's stack, write the verdict where the launcher reads it, and end the process."""
        print(f"trainer: rank {self.rank}: {verdict}; stack of rank {self.rank}:", file=self.stream, flush=True)
        with suppress(AttributeError, ValueError, OSError):  # a stream without a file descriptor
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        report = os.environ.get("TRAINER_RUN_DIR")
        if report:
            from ..reports import write_error

            write_error(report, self.rank, STALLED, verdict)
        self.stream.flush()
        os._exit(STALLED)


def job_store(timeout: float) -> dist.Store:
    """A client of the job's store for the watchdog's own use (the launcher's or torchrun's, from the
    environment), under a prefix of its own; an in-memory store when the run has a single process."""
    run, attempt = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"trainer-watchdog/{run}/{attempt}"
    if "MASTER_ADDR" not in os.environ or dist.get_world_size() == 1:
        return dist.HashStore()
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=max(30.0, timeout)),
        wait_for_workers=False,
    )
    return dist.PrefixStore(prefix, store)


@contextmanager
def watch(timeout: float, stream: TextIO = sys.stderr) -> Iterator[Watchdog]:
    """A started :class:`Watchdog` over the default group's ranks, stopped on exit."""
    dog = Watchdog(job_store(timeout), dist.get_rank(), dist.get_world_size(), timeout, stream=stream).start()
    try:
        yield dog
    finally:
        dog.stop()
