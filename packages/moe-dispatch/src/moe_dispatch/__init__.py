"""Mixture-of-experts router, token dispatchers (all-gather, all-to-all, DeepEP's ``flex``), grouped and
shared experts, EP.

Every layer takes its expert-parallel (``ep``) and expert-tensor-parallel (``etp``) groups explicitly:
a ``pstate`` axis, a process group, or ``None`` for a single rank. EP rank ``r`` holds experts
``r*E/ep`` to ``(r+1)*E/ep - 1``; expert parameters are tagged for gradient reduction over ``edp``.
"""

from pstate.tags import is_expert_parallel, mark_expert_parallel

from . import aux_loss
from .capacity import expert_capacity
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoall import AllToAllDispatcher
from .dispatch_base import Dispatcher
from .dispatch_flex import FlexDispatcher
from .errors import MoEError
from .experts import GroupedExperts
from .layer import MoELayer, expert_parallel_params
from .overlap import Compute, Exchange, OverlapTimes, StagedRun, chain, interleave
from .overlap_stack import ResidualMoE, StagedStack
from .router import TopKRouter
from .shared_expert import SharedExpert

__all__ = [
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "Compute",
    "Dispatcher",
    "Exchange",
    "FlexDispatcher",
    "GroupedExperts",
    "MoEError",
    "MoELayer",
    "OverlapTimes",
    "ResidualMoE",
    "SharedExpert",
    "StagedRun",
    "StagedStack",
    "TopKRouter",
    "aux_loss",
    "chain",
    "expert_capacity",
    "expert_parallel_params",
    "interleave",
    "is_expert_parallel",
    "mark_expert_parallel",
]
