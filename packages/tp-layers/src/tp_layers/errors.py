"""The one exception class of ``tp_layers``."""


class TensorParallelError(ValueError):
    """A shape, size or argument that tensor parallelism cannot work with; the message names it."""
