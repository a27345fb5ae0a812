"""How a multi-rank call fails: tagged with the rank, carrying the remote traceback; and a helper that
collects the errors a rank function expects."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class RankError(RuntimeError):
    """A rank raised (or died). ``rank`` is the lowest failing rank; ``__cause__`` is the original
    exception when it could be sent back."""

    def __init__(self, message: str, rank: int, remote_traceback: str):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


class RankTimeout(RankError):
    """Ranks did not finish within the timeout; the message holds each stuck rank's Python stack."""


def error_messages(calls: Iterable[Callable[[], object]], error: type[BaseException]) -> list[str | None]:
    """Run each call; the message of the ``error`` it raised, or ``None`` when it raised nothing. For
    rank functions that check several kinds of bad input in one multi-rank call."""
    messages: list[str | None] = []
    for call in calls:
        try:
            call()
        except error as raised:
            messages.append(str(raised))
        else:
            messages.append(None)
    return messages
