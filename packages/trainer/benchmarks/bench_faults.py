"""Faults and bad input against ``trainer train --nproc 2``: exit code, time to exit, message, data lost.

Times: an invalid setting from the command's start to its exit (nothing is spawned); a stall from the
SIGSTOP of rank 1 to the exit (``stall_timeout`` 10 s); SIGTERM from the signal to the exit (the ranks
finish their step and save); a killed rank with ``--max-restarts 1`` from the kill to the end of the run,
and whether its final loss equals the uninterrupted run's. "Data lost": committed checkpoints that no
longer verify, or that a run removed. Run: ``python packages/trainer/benchmarks/bench_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ckpt

ARGS = ["--nproc", "2", "--seq-len", "32", "--micro-batch", "2", "--global-batch", "4"]


def committed(save: Path) -> set[str]:
    return {p.name for p in save.glob("step_*") if (p / "index.json").exists() and not ckpt.verify(p)}


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    while True:
        for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                pass
        time.sleep(0.05)


def wait_until(condition) -> None:
    while not condition():
        time.sleep(0.05)


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "TRAINER_CACHE": str(tmp / "cache")}
        self.rows: list[tuple[str, int, float, str, str]] = []

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "trainer", "train", *ARGS, *args], cwd=self.tmp, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def finish(self, case: str, proc: subprocess.Popen, since: float, save: Path | None, before: set[str]) -> str:
        _, err = proc.communicate()
        seconds = time.monotonic() - since
        lost = sorted(before - committed(save)) if save else []
        message = err.strip().splitlines()[-1] if err.strip() else ""
        self.rows.append((case, proc.returncode, seconds, message, "none" if not lost else ", ".join(lost)))
        return err

    def invalid(self, case: str, *args: str) -> None:
        began = time.monotonic()
        self.finish(case, self.popen(*args), began, None, set())

    def stall(self) -> None:
        save, metrics = self.tmp / "stall", self.tmp / "stall.jsonl"
        run = self.popen("--steps", "100000", "--save", str(save), "--save-every", "5", "--metrics-file",
                         str(metrics), "--set", "train.stall_timeout=10")  # fmt: skip
        wait_until(lambda: (save / "step_00000005" / "index.json").exists())
        before = committed(save)
        os.kill(rank_pid(run, 1), signal.SIGSTOP)
        self.finish("rank 1 stopped (SIGSTOP), stall_timeout=10", run, time.monotonic(), save, before)

    def sigterm(self) -> None:
        save, metrics = self.tmp / "term", self.tmp / "term.jsonl"
        run = self.popen("--steps", "100000", "--save", str(save), "--save-every", "5", "--metrics-file", str(metrics))
        wait_until(lambda: (save / "step_00000005" / "index.json").exists())
        before = committed(save)
        run.send_signal(signal.SIGTERM)
        self.finish("SIGTERM to the launcher", run, time.monotonic(), save, before)

    def restart(self) -> None:
        steps = ["--steps", "30", "--save-every", "5", "--set", "train.keep=100"]  # retention would remove some
        reference, metrics, save = self.tmp / "ref.jsonl", self.tmp / "restart.jsonl", self.tmp / "restart"
        self.popen(*steps, "--metrics-file", str(reference)).communicate()
        run = self.popen(*steps, "--save", str(save), "--metrics-file", str(metrics), "--max-restarts", "1")
        wait_until(lambda: (save / "step_00000010" / "index.json").exists())
        before = committed(save)
        os.kill(rank_pid(run, 1), signal.SIGKILL)
        self.finish("rank 1 killed, --max-restarts 1", run, time.monotonic(), save, before)
        same = (
            json.loads(metrics.read_text().splitlines()[-1])["loss"]
            == json.loads(reference.read_text().splitlines()[-1])["loss"]
        )
        case, code, seconds, _, lost = self.rows[-1]
        self.rows[-1] = (case, code, seconds, f"final loss equal to the uninterrupted run's: {same}", lost)

    def table(self) -> str:
        lines = ["| case | exit | time to exit (s) | message | data lost |", "|---|---|---|---|---|"]
        for case, code, seconds, message, lost in self.rows:
            lines.append(f"| {case} | {code} | {seconds:.1f} | {message.replace('|', '/')} | {lost} |")
        return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        bench.popen("--steps", "1").communicate()  # builds the default corpus once
        bench.invalid("--lr inf", "--lr", "inf")
        bench.invalid("--set train.steps=2.5", "--set", "train.steps=2.5")
        bench.invalid("--nproc 0", "--nproc", "0")
        bench.invalid("--load of a missing path", "--load", str(Path(tmp) / "none"))
        bench.stall()
        bench.sigterm()
        bench.restart()
        print(bench.table())


if __name__ == "__main__":
    main()
