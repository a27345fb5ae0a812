"""Context parallel attention in plain PyTorch: ring (p2p, zigzag) and all-to-all (Ulysses), sequence sharding.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
