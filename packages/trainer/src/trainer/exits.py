"""The exit codes of ``trainer`` and the failure classes behind them.

======  ==========================================================================================
code    meaning
======  ==========================================================================================
0       the run finished (or stopped at ``train.exit_interval``), its last checkpoint saved
1       a bug: the traceback is printed (rank-tagged when a rank hit it)
2       a configuration, data, checkpoint or launch input the run cannot use: one line naming it
3       a rank made no progress for ``train.stall_timeout`` seconds: every rank dumped its stack
4       a rank died (killed, out of memory, segfault) and no restart was left
5       training stopped on a non-finite loss or gradient, or too many skipped steps in a row
130     SIGINT (Ctrl-C): the ranks finished their step and saved, then stopped
143     SIGTERM: the same
======  ==========================================================================================
"""

from __future__ import annotations

import signal

from ckpt import CheckpointError

from .errors import TrainerError

OK = 0
BUG = 1
USAGE = 2
STALLED = 3
RANK_DIED = 4
NOT_FINITE = 5
SIGINT = 128 + signal.SIGINT
SIGTERM = 128 + signal.SIGTERM

#: expected failures: one line for the user, never a traceback (unless ``--debug``)
USER_ERRORS: tuple[type[Exception], ...] = (TrainerError, CheckpointError)


class NotFinite(TrainerError):
    """Training stopped: a non-finite loss or gradient (not an fp16 overflow), or too many skips in a row."""

    exit_code = NOT_FINITE


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after the current step and its save; exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving")
        self.signum = signum
        self.exit_code = 128 + signum


class LaunchError(TrainerError):
    """The ranks did not finish: one failed, died or stalled (``exit_code`` says which)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code(error: BaseException) -> int:
    """The exit code an error ends the command with."""
    return getattr(error, "exit_code", USAGE if isinstance(error, USER_ERRORS) else BUG)
