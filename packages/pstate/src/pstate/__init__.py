"""Parallel layout (pure) and process groups for every parallel axis.

``ParallelConfig`` holds the axis sizes; ``layout(config, world_size)`` gives the rank grid without any
processes; ``initialize(config)`` creates the process groups of that grid as a ``ParallelState``.
The multi-rank test harness lives in :mod:`pstate.testing`.
"""

from .config import DEFAULT_ORDER, ParallelConfig
from .errors import ParallelConfigError
from .layout import Layout, layout
from .state import Axis, Group, ParallelState, as_group, initialize

__all__ = [
    "DEFAULT_ORDER",
    "Axis",
    "Group",
    "Layout",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelState",
    "as_group",
    "initialize",
    "layout",
]
