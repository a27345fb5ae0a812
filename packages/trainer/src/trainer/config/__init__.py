"""The run configuration: typed sections, TOML files, command-line overrides, and the cross-section
checks that refuse an impossible run before any process starts."""

from .check import check_run
from .inputs import check_inputs
from .resolved import RunPlan
from .run import OptimConfig, RunConfig, TrainConfig
from .toml import load_run_config, parse_run_config, to_toml

__all__ = [
    "OptimConfig",
    "RunConfig",
    "RunPlan",
    "TrainConfig",
    "check_inputs",
    "check_run",
    "load_run_config",
    "parse_run_config",
    "to_toml",
]
