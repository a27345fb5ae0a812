"""``trainer plan``: which layouts fit a model on a cluster, what each costs in memory and time, part by
part, and the fastest as a ``trainer train`` command.

:mod:`~trainer.plan.hardware` (profiles), :mod:`~trainer.plan.models` (shapes, parameter counts),
:mod:`~trainer.plan.memory`, :mod:`~trainer.plan.timing`, :mod:`~trainer.plan.pipeline` (the
simulator's bubble and in-flight micro-batches), :mod:`~trainer.plan.search`, :mod:`~trainer.plan.render`.
"""

from __future__ import annotations

from ..model import ModelConfig
from .estimate import Cluster, Estimate, estimate, evaluate
from .hardware import Hardware, known_hardware, load_hardware
from .layout import Layout, Workload
from .memory import Memory, layer_activations, memory
from .models import model_from_hf_config, parameter_count, resolve_model
from .pipeline import PipelineCost, pipeline_cost
from .render import command, render, render_json
from .search import search, smallest_cluster
from .timing import StepTime, step_time

Plan = Estimate


def plan(
    model: ModelConfig,
    cluster: Cluster,
    *,
    seq_len: int,
    global_batch: int,
    top: int = 5,
    precision: str = "bf16",
    fixed: dict | None = None,
) -> list[Estimate]:
    """The ``top`` layouts that fit, fastest first (see :func:`search`)."""
    work = Workload(model, seq_len, global_batch, precision)
    return search(work, cluster.gpus, cluster.profile, top=top, fixed=fixed)


__all__ = [
    "Cluster",
    "Estimate",
    "Hardware",
    "Layout",
    "Memory",
    "PipelineCost",
    "Plan",
    "StepTime",
    "Workload",
    "command",
    "estimate",
    "evaluate",
    "known_hardware",
    "layer_activations",
    "load_hardware",
    "memory",
    "model_from_hf_config",
    "parameter_count",
    "pipeline_cost",
    "plan",
    "render",
    "render_json",
    "resolve_model",
    "search",
    "smallest_cluster",
    "step_time",
]
