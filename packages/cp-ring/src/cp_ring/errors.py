"""The one exception class of ``cp_ring``."""


class ContextParallelError(ValueError):
    """A shape, size or argument that context parallelism cannot work with; the message names it."""
