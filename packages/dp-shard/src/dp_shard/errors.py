"""The one exception class of ``dp_shard``."""


class DataParallelError(ValueError):
    """A module, group or call sequence that data parallelism cannot work with; the message names it."""
