"""The one exception type of ``pstate``."""


class ParallelConfigError(ValueError):
    """A parallel configuration that cannot work; the message names the field, the value and the rule."""
