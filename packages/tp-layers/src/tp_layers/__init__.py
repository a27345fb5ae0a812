"""Tensor and sequence parallel layers, mappings, vocab-parallel cross entropy and TP-aware RNG.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
