"""Sharded, atomic, async distributed checkpoints that load into any other parallel layout.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
