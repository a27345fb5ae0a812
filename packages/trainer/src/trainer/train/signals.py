"""SIGTERM and SIGINT during training: finish the current step, save, then stop with a distinct exit code.

The first signal asks the loop to stop after its step (and the save the loop then makes); a second one
ends the process at once with 128 + the signal (a save in progress is left as a hidden partial
directory, which the next start removes).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..exits import Interrupted


class StopRequest:
    """A stop the ranks agree on. ``received``: a signal this rank got (set by the handler at any moment);
    ``requested``: why every rank stops after this step (a signal number or a reason string), changed
    only by :meth:`agree` and by the loop, so a signal landing mid-step cannot make one rank stop alone."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.requested: int | str | None = None

    def agree(self, device: torch.device) -> None:
        """Make every rank see a signal any rank had received by now (collective over the world, once a
        step), so that all stop after the same step and save together."""
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.requested = int(flag.item())

    def raise_if_signalled(self) -> None:
        """After the loop saved: raise :class:`Interrupted` when a signal stopped it."""
        if isinstance(self.requested, int):
            raise Interrupted(self.requested)


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGINT into a stop request (main thread only; elsewhere signals keep their handlers)."""
    stop = StopRequest()
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.received is not None:
            os._exit(128 + signum)
        stop.received = signum

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
