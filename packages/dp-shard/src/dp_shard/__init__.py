"""Data parallelism: bucketed DDP, distributed optimizer (ZeRO-1/2), FSDP (ZeRO-3), gradient clipping, mixed precision.

Skeleton: the public API arrives with this package's issue; nothing is exported yet.
"""

__all__: list[str] = []
