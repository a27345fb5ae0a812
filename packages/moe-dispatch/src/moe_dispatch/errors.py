"""The one exception class of ``moe_dispatch``."""


class MoEError(ValueError):
    """Bad configuration or input for a mixture-of-experts layer; the message names the field, value and rule."""
