"""``fully_shard``: ZeRO-3 / FSDP. Parameters are stored sharded across the data-parallel group and
gathered one unit at a time, just before that unit runs.

Each unit (see :mod:`dp_shard.fsdp_plan` for how parameters are assigned) keeps one flat shard of its
parameters per rank (:mod:`dp_shard.fsdp_unit`). Hooks on the unit modules drive the schedule:

- forward: before a unit's forward its parameters are all-gathered (in ``param_dtype``), after it they
  are freed; with ``prefetch`` the next unit's all-gather (the order the last forward used, at first
  the order of ``named_modules()``) starts asynchronously before the current unit computes;
- backward: a hook on a unit's outputs gathers it again as soon as the gradient reaches them (and with
  ``prefetch`` starts gathering the unit the backward reaches next: the reverse of the order in which
  forwards finished); once autograd has produced every gradient of the unit its gathered copy is freed
  and its gradient reduce-scattered (in ``reduce_dtype``, averaged over the group) into the pieces'
  ``.grad``. One reduce-scatter is in flight at a time, overlapping the next unit's backward; the last
  one is finished by a callback at the end of the backward pass.

What the optimizer sees. ``module.parameters()`` yields, under the original names, this rank's piece
of each parameter (1-D, possibly empty). Any ``torch.optim`` optimizer built on them steps only the
local shard, which is ZeRO-3's sharded optimizer step; parameter groups by name (weight decay on/off)
work as usual. Gradients arrive averaged over the group; there is no ``finish_grad_sync`` to call.

HSDP and experts. With a ``replicate_group`` the parameters are sharded within ``group`` and replicated
across the replicate group: gathers stay within the shard group, and each gradient element is
reduce-scattered there and its shard all-reduced across the replicas (once per step under ``no_sync``).
Parameters tagged ``expert_parallel`` form flat shards of their own over ``expert_group``; a unit with
both kinds gathers, frees and reduces the two together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import pstate
from pstate.tags import is_expert_parallel

from .checks import check_same_parameters
from .errors import DataParallelError
from .fsdp_checkpoint import (
    load_optimizer_state_shards,
    load_parameter_shards,
    optimizer_state_shards,
    parameter_shards,
)
from .fsdp_plan import Units, assign_parameters, check_dtypes, resolve_units
from .fsdp_state import STATE_ATTRIBUTE, FullyShardedState, sharded_state
from .fsdp_unit import PIECE_ATTRIBUTE, FlatUnit

__all__ = [
    "FullyShardedState",
    "fully_shard",
    "load_optimizer_state_shards",
    "load_parameter_shards",
    "optimizer_state_shards",
    "parameter_shards",
    "sharded_state",
]


def fully_shard(
    module: nn.Module,
    *,
    group: pstate.Group,
    units: Units = None,
    prefetch: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    replicate_group: pstate.Group | None = None,
    expert_group: pstate.Group | None = None,
    average: bool = True,
) -> nn.Module:
    """Shard ``module``'s trainable parameters over ``group`` (ZeRO-3), in place; returns ``module``.

    ``units``: the submodules gathered one at a time: a list of submodules, a module class (or tuple of
    classes: every submodule of that type, e.g. the transformer layer class) or a predicate
    ``(name, module) -> bool``; ``None`` makes the whole model one unit. The root holds the parameters
    no unit claims (and shared ones; see :mod:`dp_shard.fsdp_plan`). ``prefetch`` overlaps the next
    unit's all-gather with the current unit's compute. ``param_dtype`` (e.g. ``torch.bfloat16``) is the
    dtype parameters are gathered and computed in while shards stay in their own dtype (fp32 master
    weights); floating-point inputs of every unit are cast to it. ``reduce_dtype`` is the dtype of the
    gradient reduce-scatter (``None``: the compute dtype).

    ``replicate_group`` (HSDP, e.g. ``ps.dp_replicate`` with ``group=ps.dp_shard``): the ranks holding
    the same shards in the other shard groups; each unit's gradient shard is all-reduced over it after the
    reduce-scatter, and gradients are averaged over both groups. ``expert_group`` (``ps.edp``): parameters
    tagged ``expert_parallel`` get flat shards of their own in their unit, sharded over it (the ranks
    holding the same experts), with gradients divided by the dense data-parallel size (``group`` times
    ``replicate_group``), since every dense replica's tokens reach the experts. ``average=False`` sums the
    gradients over the groups instead (the caller weighted each rank's loss by one over the dense size).

    Every rank must call the wrapped module the same way: the same units, in the same order, with
    every unit's output reaching the loss on all ranks or on none (collectives match by order).
    """
    if not isinstance(module, nn.Module):
        raise DataParallelError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if any(STATE_ATTRIBUTE in m.__dict__ for m in module.modules()) or any(
        getattr(p, PIECE_ATTRIBUTE, False) for p in module.parameters()
    ):
        raise DataParallelError(f"this {type(module).__name__} is already (partly) fully sharded")
    if not isinstance(prefetch, bool):
        raise DataParallelError(f"prefetch={prefetch!r} must be True or False")
    if not isinstance(average, bool):
        raise DataParallelError(f"average={average!r} must be True or False")
    check_dtypes(param_dtype, reduce_dtype)
    process_group = pstate.as_group(group)
    replicas = None if replicate_group is None else pstate.as_group(replicate_group)
    experts = None if expert_group is None else pstate.as_group(expert_group)
    planned = resolve_units(module, units)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise DataParallelError(f"{type(module).__name__} has no trainable parameters to shard")
    tagged = [n for n, p in named if is_expert_parallel(p)]
    if tagged and experts is None:
        raise DataParallelError(
            f"{tagged[0]!r} is tagged expert_parallel but no expert_group was given: its ranks hold other "
            "experts, so sharding it over the data-parallel group would mix them; pass expert_group=ps.edp"
        )
    check_same_parameters(named, process_group)
    planned = assign_parameters(module, planned)
    dense_size = dist.get_world_size(process_group) * (1 if replicas is None else dist.get_world_size(replicas))
    common = dict(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    flat_units = []
    for u in planned:
        dense = [entry for entry in u.params if not is_expert_parallel(entry[2])]
        expert = [entry for entry in u.params if is_expert_parallel(entry[2])]
        if dense:
            divide = None if average else 1  # None: the shard group's size times the replicas'
            flat = FlatUnit(
                u.name, u.module, dense, group=process_group, replicate_group=replicas, divide_by=divide, **common
            )
            flat_units.append(flat)
        if expert:
            divide = dense_size if average else 1
            flat_units.append(FlatUnit(u.name, u.module, expert, group=experts, divide_by=divide, **common))
    state = FullyShardedState(module, flat_units, process_group, prefetch=prefetch, param_dtype=param_dtype)
    module.__dict__[STATE_ATTRIBUTE] = state
    return module
