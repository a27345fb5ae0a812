"""The umbrella: GPT model, data pipeline, training loop, inference, planner and the trainer CLI.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
