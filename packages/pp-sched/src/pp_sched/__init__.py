"""Pipeline schedules as data (GPipe, 1F1B, interleaved, zero-bubble), their simulator and renderer,
the executor and p2p.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
