"""Data parallelism: bucketed DDP, distributed optimizer (ZeRO-1/2), FSDP (ZeRO-3), gradient clipping, mixed precision.

Available now: :class:`DataParallel` (bucketed, overlapped gradient all-reduce with fp32 main gradients
for low-precision parameters), :class:`ShardedOptimizer` (ZeRO-1/2 around any ``torch.optim``
optimizer, with a state dict ``ckpt`` can reshard), :class:`LossScaler` (dynamic fp16 loss scaling) and
:func:`clip_grad_norm_` (the global norm over TP/PP/DP-split models).
"""

from .clip import clip_grad_norm_
from .data_parallel import DataParallel
from .errors import DataParallelError
from .loss_scaler import LossScaler
from .sharded_optimizer import ShardedOptimizer

__all__ = ["DataParallel", "DataParallelError", "LossScaler", "ShardedOptimizer", "clip_grad_norm_"]
