"""Data parallelism: bucketed DDP, distributed optimizer (ZeRO-1/2), FSDP (ZeRO-3), gradient clipping, mixed precision.

Available now: :class:`DataParallel` (bucketed, overlapped gradient all-reduce with fp32 main gradients
for low-precision parameters) and :func:`clip_grad_norm_` (the global norm over TP/PP-split models).
"""

from .clip import clip_grad_norm_
from .data_parallel import DataParallel
from .errors import DataParallelError

__all__ = ["DataParallel", "DataParallelError", "clip_grad_norm_"]
