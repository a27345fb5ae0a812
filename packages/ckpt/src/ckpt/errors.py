"""The one exception type of ``ckpt``."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the key, file or rank at fault."""
