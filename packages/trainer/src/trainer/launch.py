"""Starting the ranks of a run: under ``torchrun`` (the environment says the world), in this process
(one rank), or ``--nproc N`` local ranks started by :class:`LocalLauncher`.

The local launcher hosts the job's key-value store itself (a stalled rank cannot take it down), starts
one process per rank in its own session, and watches them: the first rank that fails ends the others at
once (a stall waits a little for every rank's stack dump), and the failure comes back as one line with its
exit code (:mod:`trainer.exits`). SIGTERM or SIGINT is passed on once to every rank, which finish their step
and save; the launcher waits for that however long it takes (a second signal kills them).
``max_restarts``: after a rank failure, start the ranks again, up to that many times; they resume from
the newest intact checkpoint under ``--save``.

Multi-node: run ``torchrun --nnodes ... --nproc-per-node ... [--max-restarts N] -m trainer train ...`` on
every node (under SLURM, one ``srun`` task per node running that torchrun command, with
``--rdzv-endpoint`` the first node); ``train`` reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` as torchrun
sets them. Checkpoints then need a file system every node sees.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from pstate.device import backend_for, default_device

from . import exits
from .config import RunConfig, parse_run_config, to_toml
from .reports import read_errors, read_records


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def global_rank() -> int:
    """This process's rank in the run (0 for the local launcher, which starts the ranks itself)."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def world_size(nproc: int | None) -> int:
    """The number of ranks the run will have."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return nproc or 1


def run_ranks(
    cfg: RunConfig, nproc: int | None, *, max_restarts: int = 0, stream: TextIO = sys.stderr
) -> list[dict[str, Any]]:
    """Train ``cfg`` on the ranks the situation gives; returns rank 0's records (or this rank's)."""
    if under_torchrun() or not nproc or nproc == 1:
        return train_here(to_toml(cfg), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return LocalLauncher(cfg, nproc, max_restarts=max_restarts, stream=stream).run()


def train_here(cfg_toml: str, local_world: int) -> list[dict[str, Any]]:
    """Join (or create) the default group and train; the config travels as TOML text."""
    from .train.loop import train
    from .train.watchdog import collective_timeout

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL enforces its timeouts
    cfg = parse_run_config(cfg_toml)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    device = default_device()
    if device.type != "cpu":
        torch.cuda.set_device(device)
    with default_group(device, collective_timeout(cfg.train)):
        return train(cfg)


@contextmanager
def default_group(device: torch.device, timeout: timedelta | None = None) -> Iterator[None]:
    """The default process group: torchrun's (from the environment), or a one-rank group of this process;
    destroyed on exit if made here (after a barrier when the run succeeded)."""
    created = not dist.is_initialized()
    extra = {} if timeout is None else {"timeout": timeout}
    if created:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend_for(device), **extra)
        else:  # one rank, no launcher
            dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1, **extra)
    ok = False
    try:
        yield
        ok = True
    finally:
        if created:
            if ok:
                dist.barrier()
            dist.destroy_process_group()


@dataclass
class _Outcome:
    code: int  # 0: every rank finished
    message: str = ""

    @property
    def restartable(self) -> bool:
        return self.code not in (exits.OK, exits.USAGE, exits.NOT_FINITE, exits.SIGINT, exits.SIGTERM)


class LocalLauncher:
    """Runs ``nproc`` ranks of ``cfg`` on this machine (see the module's docstring)."""

    def __init__(self, cfg: RunConfig, nproc: int, *, max_restarts: int = 0, stream: TextIO = sys.stderr) -> None:
        self.cfg, self.nproc, self.max_restarts, self.stream = cfg, nproc, max_restarts, stream
        self.signalled: int | None = None
        self.procs: list[subprocess.Popen] = []
        # a stall: every rank dumps its stack within two watchdog intervals of the first
        self.dump_grace = 2 * min(5.0, cfg.train.stall_timeout / 5) + 2.0

    def run(self) -> list[dict[str, Any]]:
        """Rank 0's records; raises :class:`trainer.exits.LaunchError` or ``Interrupted`` when the ranks stop."""
        with self._signals():
            for attempt in range(self.max_restarts + 1):
                run_dir = Path(tempfile.mkdtemp(prefix="trainer-run-"))
                try:
                    outcome = self._attempt(attempt, run_dir)
                    if outcome.code == exits.OK:
                        return read_records(run_dir)
                finally:
                    shutil.rmtree(run_dir, ignore_errors=True)
                if self.signalled is not None:
                    raise exits.Interrupted(self.signalled)
                if not outcome.restartable or attempt == self.max_restarts:
                    raise exits.LaunchError(outcome.message, outcome.code)
                print(
                    f"trainer: {outcome.message}; restart {attempt + 1} of {self.max_restarts}: "
                    "resuming from the newest intact checkpoint",
                    file=self.stream,
                    flush=True,
                )
        raise AssertionError("unreachable")

    def _attempt(self, attempt: int, run_dir: Path) -> _Outcome:
        (run_dir / "config.toml").write_text(to_toml(self.cfg))
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        base = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "WORLD_SIZE": str(self.nproc),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True",  # the ranks are clients of this process's store
            "TORCHELASTIC_RUN_ID": f"trainer-{uuid.uuid4().hex[:8]}",
            "TORCHELASTIC_RESTART_COUNT": str(attempt),
            "TRAINER_RUN_DIR": str(run_dir),
        }
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "trainer.rank"],
                env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only; it passes it on once
            )
            for r in range(self.nproc)
        ]
        try:
            return self._watch(run_dir)
        finally:
            self._kill_all()
            del store

    def _watch(self, run_dir: Path) -> _Outcome:
        first: tuple[int, int] | None = None  # (rank, code) of the first failure
        failed_at = 0.0
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if first is None:
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad and self.signalled is None:
                    first, failed_at = bad[0], time.monotonic()
                    if first[1] != exits.STALLED:
                        self._kill_all()
            elif time.monotonic() - failed_at > self.dump_grace:
                self._kill_all()  # the stalled ranks that cannot dump their stack (stopped, frozen)
            time.sleep(0.05)
        codes = [p.returncode for p in self.procs]
        if all(c == 0 for c in codes):
            return _Outcome(exits.OK)
        if self.signalled is not None and first is None:
            return _Outcome(128 + self.signalled, f"stopped by {signal.Signals(self.signalled).name}")
        if first is None:
            first = next((r, c) for r, c in enumerate(codes) if c != 0)
        return _classify(first, codes, read_errors(run_dir))

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def _forward(self, signum: int, frame: Any) -> None:
        if self.signalled is not None:  # the second signal: do not wait for the save
            self._kill_all_nowait()
            return
        self.signalled = signum
        print(
            f"trainer: {signal.Signals(signum).name}: the ranks finish their step and save, then stop "
            "(send it again to stop at once)",
            file=self.stream,
            flush=True,
        )
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _kill_all_nowait(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._forward)
        except ValueError:  # not the main thread: signals keep their handlers
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _classify(first: tuple[int, int], codes: list[int], errors: dict[int, dict[str, Any]]) -> _Outcome:
    """One line and an exit code for a failed attempt, from the first failure and what the ranks reported."""
    stalled = [e for e in errors.values() if e["code"] == exits.STALLED]
    if stalled:
        return _Outcome(exits.STALLED, stalled[0]["message"])
    rank, code = first
    if rank in errors:
        report = errors[rank]
        same = all(e["message"] == report["message"] for e in errors.values()) and len(errors) == len(codes)
        where = "" if same else f"rank {rank}: "
        return _Outcome(report["code"], f"{where}{report['message']}")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return _Outcome(exits.RANK_DIED, f"rank {rank} died ({name}); every other rank was stopped")
    return _Outcome(exits.RANK_DIED, f"rank {rank} exited with code {code}; every other rank was stopped")
