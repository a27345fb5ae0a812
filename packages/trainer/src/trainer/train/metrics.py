"""What the loop reports on rank 0: step lines (with a progress bar on a terminal), ``--metrics-file`` JSON
lines and TensorBoard scalars under grouped tags (``train/``, ``perf/``, ``memory/``, ``eval/``, ``comm/``).

TensorBoard needs the ``tensorboard`` package; without it ``--tensorboard`` is refused at start.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import TrainerError
from .report import Checkpoints, ProgressBar

#: TensorBoard group of each record field; the JSON lines keep the bare names.
GROUPS = {
    "loss": "train", "lr": "train", "grad_norm": "train", "loss_scale": "train", "skipped": "train",
    "tokens": "train", "tokens_per_s": "perf", "mfu": "perf", "hfu": "perf", "step_time_s": "perf",
    "data_time_s": "perf",
    "memory_mb": "memory", "memory_reserved_mb": "memory", "eval_loss": "eval", "eval_ppl": "eval",
}  # fmt: skip


class Metrics:
    """Writes one record per step (and per evaluation) where asked; inactive on ranks other than 0."""

    def __init__(self, *, active: bool, metrics_file: str | None, tensorboard: str | None, stream: TextIO = sys.stderr):
        self.active, self.stream = active, stream
        self.file = self.writer = None
        self.checkpoints = Checkpoints(self.note)
        self._bar: ProgressBar | None = None
        self._began, self._start = time.perf_counter(), 0
        if not active:
            return
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(metrics_file, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainerError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(tensorboard)

    def start(self, total_steps: int, start: int) -> None:
        """The loop begins at step ``start`` of ``total_steps``: the clock of the ETA starts now."""
        self._began, self._start = time.perf_counter(), start
        if self.active:
            self._bar = ProgressBar(self.stream, total_steps, start)

    def step(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.active:
            return
        self._write(record)
        done = record["step"] - self._start
        elapsed = time.perf_counter() - self._began
        eta = elapsed / done * (total_steps - record["step"]) if done > 0 else 0.0
        line = (
            f"step {record['step']:>6}/{total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:,.0f}  "
            f"mfu {100 * record['mfu']:.1f}%  mem {record['memory_mb']:,.0f} MB  eta {_clock(eta)}"
        )
        if "mtp_loss" in record:  # multi-token prediction: its loss beside the main one
            line += f"  mtp_loss {record['mtp_loss']:.4f}"
        if record.get("skipped"):
            line += "  (skipped: non-finite)"
        axes = [k.removeprefix("comm_").removesuffix("_bytes") for k in record if k.endswith("_bytes")]
        if axes:  # --comm-report: this rank's bytes and seconds per axis
            mb = {a: record[f"comm_{a}_bytes"] / 2**20 for a in axes}
            parts = [f"{a} {mb[a]:.3f} MB {1e3 * record[f'comm_{a}_s']:.1f} ms" for a in axes]
            line += "\n  comm (rank 0): " + ", ".join(parts)
        self._print(line)
        if self._bar is not None:
            self._bar.update(record["step"], record)

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self._write(record)
        self._print(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}")

    def banner(self, lines: list[str]) -> None:
        for line in lines:
            self.note(line)

    def note(self, text: str) -> None:
        if self.active:
            self._print(text)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = GROUPS.get(key, "comm" if key.startswith("comm_") else "train")
                    self.writer.add_scalar(f"{group}/{key}", value, record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}")  # fmt: skip
