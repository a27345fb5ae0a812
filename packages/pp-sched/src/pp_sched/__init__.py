"""Pipeline schedules as data (GPipe, 1F1B, interleaved 1F1B, zero-bubble, ZB-V, DualPipe-V), their simulator
and renderer.

``build(name, pp=..., microbatches=...)`` gives a :class:`Schedule`: every rank's ordered
:class:`Action` list. ``validate`` checks a schedule (also a hand-edited one) cannot deadlock,
``simulate`` runs it on a model of time, ``render`` / ``render_image`` draw it, and ``split_layers``
says which layers each stage holds. ``PipelineExecutor`` runs a schedule on this rank's model chunks,
with :class:`StageP2P` carrying activations and gradients between adjacent stages.
"""

from .action import Action, Schedule
from .errors import PipelineScheduleError
from .executor import PipelineExecutor, StepResult
from .layers import StageLayers, split_layers, stage_costs
from .p2p import StageP2P, TensorSpec
from .render import render, render_image
from .schedules import SCHEDULES, V_SCHEDULES, build
from .simulate import Simulation, Slot, simulate, validate

__all__ = [
    "SCHEDULES",
    "V_SCHEDULES",
    "Action",
    "PipelineExecutor",
    "PipelineScheduleError",
    "Schedule",
    "Simulation",
    "Slot",
    "StageLayers",
    "StageP2P",
    "StepResult",
    "TensorSpec",
    "build",
    "render",
    "render_image",
    "simulate",
    "split_layers",
    "stage_costs",
    "validate",
]
