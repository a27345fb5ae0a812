"""Data parallelism: bucketed DDP, distributed optimizer (ZeRO-1/2), FSDP (ZeRO-3), gradient clipping, mixed precision.

Available now: :class:`DataParallel` (bucketed, overlapped gradient all-reduce with fp32 main gradients
for low-precision parameters), :class:`ShardedOptimizer` (ZeRO-1/2 around any ``torch.optim``
optimizer, with a state dict ``ckpt`` can reshard), :class:`LossScaler` (dynamic fp16 loss scaling) and
:func:`fully_shard` (ZeRO-3: parameters sharded per unit, gathered for each unit's forward and
backward, gradients reduce-scattered; checkpoint pieces through :func:`parameter_shards` and
:func:`optimizer_state_shards`) and :func:`clip_grad_norm_` (the global norm over TP/PP/DP/EP-split
models). :func:`make_engine` gives the one interface a training loop holds over all of them
(:class:`DataParallelEngine`: accumulate, finish the step's gradients once, the step protocol), with
Megatron's mixed precision for 16-bit weights (fp32 main gradients and masters; :func:`bytes_per_param`
gives the table of bytes per parameter per rank).
"""

from .clip import clip_grad_norm_
from .data_parallel import DataParallel
from .engine import ClipGroups, DataParallelEngine
from .engine_state import CheckpointPieces
from .engines import DDPEngine, FSDPEngine, ZeroEngine, make_engine
from .errors import DataParallelError
from .fully_shard import (
    fully_shard,
    load_optimizer_state_shards,
    load_parameter_shards,
    optimizer_state_shards,
    parameter_shards,
)
from .loss_scaler import LossScaler
from .memory import bytes_per_param
from .sharded_optimizer import ShardedOptimizer

__all__ = [
    "CheckpointPieces",
    "ClipGroups",
    "DDPEngine",
    "DataParallel",
    "DataParallelEngine",
    "DataParallelError",
    "FSDPEngine",
    "LossScaler",
    "ShardedOptimizer",
    "ZeroEngine",
    "bytes_per_param",
    "clip_grad_norm_",
    "fully_shard",
    "load_optimizer_state_shards",
    "load_parameter_shards",
    "make_engine",
    "optimizer_state_shards",
    "parameter_shards",
]
