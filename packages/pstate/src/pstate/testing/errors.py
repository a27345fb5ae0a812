"""How a multi-rank call fails: tagged with the rank, carrying the remote traceback."""


class RankError(RuntimeError):
    """A rank raised (or died). ``rank`` is the lowest failing rank; ``__cause__`` is the original
    exception when it could be sent back."""

    def __init__(self, message: str, rank: int, remote_traceback: str):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


class RankTimeout(RankError):
    """Ranks did not finish within the timeout; the message holds each stuck rank's Python stack."""
