"""Parallel layout (pure) and process groups for every parallel axis.

``ParallelConfig`` holds the axis sizes; ``layout(config, world_size)`` gives the rank grid without any
processes; ``initialize(config)`` creates the process groups of that grid as a ``ParallelState``.
``Shard`` describes a piece of a split tensor in the full tensor's frame (for checkpoints).
The multi-rank test harness lives in :mod:`pstate.testing`.
"""

from .config import DEFAULT_ORDER, ParallelConfig
from .errors import ParallelConfigError
from .layout import Layout, layout
from .overlap import interleave
from .shards import Shard, tensor_parallel_shard
from .state import Axis, Group, ParallelState, as_group, initialize

__all__ = [
    "DEFAULT_ORDER",
    "Axis",
    "Group",
    "Layout",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelState",
    "Shard",
    "as_group",
    "initialize",
    "interleave",
    "layout",
    "tensor_parallel_shard",
]
