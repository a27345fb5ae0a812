"""Parameters and optimizer state of a fully sharded module as :class:`pstate.Shard` s, and back.

Each original parameter (under its original name, tied ones once) is described in its own frame:
``global_shape`` is the parameter's full shape, ``offsets`` are zeros, and ``flat_range = (start,
stop)`` are the elements of the row-major flattened parameter that this rank stores (possibly an
empty range). A checkpoint that records these pieces can be reassembled into full tensors and loaded
at any other data-parallel size: :func:`load_parameter_shards` takes, per name, any ``Shard`` of the
whole parameter whose flat range covers this rank's range (a full tensor, or exactly this rank's
piece as :func:`parameter_shards` describes it, filled).

Optimizer state follows the parameters: a ``torch.optim`` optimizer stepping the pieces keeps, per
piece, tensors shaped like the piece (AdamW's ``exp_avg``, ``exp_avg_sq``): they are returned as
``Shard`` s with the parameter's frame and flat range; every other value (``step``) is the same on
every rank holding that parameter and is returned as it is. Hyperparameters live in
``optimizer.state_dict()["param_groups"]`` and are not part of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pstate import Shard

from .errors import DataParallelError
from .fsdp_state import sharded_state
from .fsdp_unit import Slot


def parameter_shards(module: nn.Module) -> dict[str, Shard]:
    """This rank's piece of every sharded parameter of ``module`` (a :func:`fully_shard` ed module)."""
    return {slot.name: _describe(slot, slot.piece.detach()) for slot in _slots(module).values()}


def load_parameter_shards(module: nn.Module, shards: Mapping[str, Shard]) -> None:
    """Copy each parameter's part for this rank out of ``shards`` (name -> ``Shard``, see the module
    notes) into the local pieces. Every sharded parameter must be present; everything is checked
    before anything is written."""
    slots = _slots(module)
    _check_names(slots, shards, "load_parameter_shards")
    parts = {name: _part(slot, shards[name], name) for name, slot in slots.items()}
    with torch.no_grad():
        for name, slot in slots.items():
            slot.piece.copy_(parts[name])


def optimizer_state_shards(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """``{parameter name: {state key: Shard or value}}`` for every piece of ``module`` that
    ``optimizer`` holds state for (none before its first step)."""
    result: dict[str, dict[str, Any]] = {}
    for name, slot in _slots(module).items():
        state = optimizer.state.get(slot.piece)
        if not state:
            continue
        result[name] = {
            key: _describe(slot, value) if _elementwise(slot, value) else value for key, value in state.items()
        }
    return result


def load_optimizer_state_shards(
    module: nn.Module, optimizer: torch.optim.Optimizer, shards: Mapping[str, Mapping[str, Any]]
) -> None:
    """Set ``optimizer``'s state for every piece of ``module`` it steps from ``shards`` (the form of
    :func:`optimizer_state_shards`, from any data-parallel size: a ``Shard`` entry is cut down to this
    rank's range, any other value is copied). Checked in full before anything is set."""
    slots = {name: slot for name, slot in _slots(module).items() if _steps(optimizer, slot.piece)}
    _check_names(slots, shards, "load_optimizer_state_shards")
    states = {}
    for name, slot in slots.items():
        entries = shards[name]
        if not isinstance(entries, Mapping):
            raise DataParallelError(f"optimizer state of {name!r} must be a mapping of state keys, got {entries!r}")
        states[name] = {
            key: _part(slot, value, f"{name}[{key!r}]").to(slot.piece.device, copy=True)
            if isinstance(value, Shard)
            else _copy(value)
            for key, value in entries.items()
        }
    for name, slot in slots.items():
        optimizer.state[slot.piece] = states[name]


def _slots(module: nn.Module) -> dict[str, Slot]:
    return {slot.name: slot for unit in sharded_state(module).units for slot in unit.slots}


def _steps(optimizer: torch.optim.Optimizer, piece: nn.Parameter) -> bool:
    return any(p is piece for group in optimizer.param_groups for p in group["params"])


def _describe(slot: Slot, data: torch.Tensor) -> Shard:
    shape = tuple(slot.shape)
    return Shard(data, shape, (0,) * len(shape), shape, flat_range=slot.local)


def _elementwise(slot: Slot, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == slot.piece.shape and value.dim() == 1


def _check_names(slots: Mapping[str, Slot], shards: Mapping[str, Any], what: str) -> None:
    missing = sorted(set(slots) - set(shards))
    unknown = sorted(set(shards) - set(slots))
    if missing or unknown:
        raise DataParallelError(
            f"{what}: the module's sharded parameters and the names given differ: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unknown {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )


def _part(slot: Slot, shard: Shard, label: str) -> torch.Tensor:
    """The elements ``slot.local`` of the parameter, taken from ``shard`` (checked)."""
    if not isinstance(shard, Shard):
        raise DataParallelError(f"{label}: expected a pstate.Shard, got {type(shard).__name__}")
    shape = tuple(slot.shape)
    if shard.global_shape != shape:
        raise DataParallelError(
            f"{label}: the Shard has global shape {list(shard.global_shape)}, the parameter {list(shape)}"
        )
    if any(shard.offsets) or shard.shape != shape:
        raise DataParallelError(
            f"{label}: the Shard is the rectangle at {list(shard.offsets)} of shape {list(shard.shape)}; give the "
            "whole parameter or a flat range of it"
        )
    start, stop = shard.flat_range or (0, slot.numel)
    low, high = slot.local
    if low < high and not start <= low <= high <= stop:
        raise DataParallelError(
            f"{label}: this rank needs elements [{low}, {high}) of the flattened parameter; "
            f"the Shard holds [{start}, {stop})"
        )
    return shard.data.reshape(-1)[low - start : high - start] if low < high else shard.data.new_empty(0)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
