"""Pipeline schedules as data (GPipe, 1F1B, interleaved 1F1B, zero-bubble), their simulator and renderer.

``build(name, pp=..., microbatches=...)`` gives a :class:`Schedule`: every rank's ordered
:class:`Action` list. ``validate`` checks a schedule (also a hand-edited one) cannot deadlock,
``simulate`` runs it on a model of time, ``render`` / ``render_image`` draw it, and ``split_layers``
says which layers each stage holds. The executor and p2p are not built yet.
"""

from .action import Action, Schedule
from .errors import PipelineScheduleError
from .layers import StageLayers, split_layers
from .render import render, render_image
from .schedules import SCHEDULES, build
from .simulate import Simulation, Slot, simulate, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "PipelineScheduleError",
    "Schedule",
    "Simulation",
    "Slot",
    "StageLayers",
    "build",
    "render",
    "render_image",
    "simulate",
    "split_layers",
    "validate",
]
