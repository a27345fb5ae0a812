"""The one exception base of ``trainer``."""


class TrainerError(ValueError):
    """A configuration or input the trainer cannot use; the message names the field, value and rule."""
