"""What the loop reports on rank 0: a progress line, ``--metrics-file`` JSON lines and TensorBoard.

TensorBoard needs the ``tensorboard`` package; without it ``--tensorboard`` is refused at start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import TrainerError


class Metrics:
    """Writes one record per step (and per evaluation) where asked; inactive on ranks other than 0."""

    def __init__(self, *, active: bool, metrics_file: str | None, tensorboard: str | None, stream: TextIO = sys.stderr):
        self.active, self.stream = active, stream
        self.file = self.writer = None
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

    def step(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.active:
            return
        self._write(record)
        line = (
            f"step {record['step']:>6}/{total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:,.0f}  "
            f"mfu {100 * record['mfu']:.1f}%  mem {record['memory_mb']:,.0f} MB"
        )
        if record.get("skipped"):
            line += "  (skipped: non-finite)"
        axes = [k.removeprefix("comm_").removesuffix("_bytes") for k in record if k.endswith("_bytes")]
        if axes:  # --comm-report: this rank's bytes and seconds per axis
            mb = {a: record[f"comm_{a}_bytes"] / 2**20 for a in axes}
            parts = [f"{a} {mb[a]:.3f} MB {1e3 * record[f'comm_{a}_s']:.1f} ms" for a in axes]
            line += "\n  comm (rank 0): " + ", ".join(parts)
        print(line, file=self.stream, flush=True)

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self._write(record)
        print(
            f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}",
            file=self.stream,
            flush=True,
        )

    def note(self, text: str) -> None:
        if self.active:
            print(text, file=self.stream, flush=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
