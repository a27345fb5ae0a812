"""Mixture-of-experts router, token dispatchers (all-gather, all-to-all), grouped experts, expert parallelism.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
