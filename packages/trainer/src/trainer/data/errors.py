"""The exception type of ``trainer.data``: a :class:`trainer.errors.TrainerError`, the package's one base."""

from trainer.errors import TrainerError


class DataError(TrainerError):
    """Data that cannot be used as asked (missing, corrupt, empty, inconsistent); the message names the file or rule."""
