"""``ShardedOptimizer.state_dict()`` / ``load_state_dict()`` in a form ``ckpt`` can reshard.

Form (see the docs page for the contract)::

    {"state": {key: {"master_param": Shard, "exp_avg": Shard, ..., "step": tensor}},
     "param_groups": [{"lr": ..., ..., "params": [key, ...]}],
     "loss_scaler": {...}}                      # only with a loss scaler

Every rank lists every parameter. A per-element state (and the master weight) is a ``pstate.Shard``
in the frame of the parameter as it is on this rank: ``global_shape`` = ``shape`` = the parameter's
shape, zero offsets, ``flat_range`` = the elements this rank owns, ``(0, 0)`` with empty data where it
owns none (an expert parameter's elements are shared out over the expert group). Scalar states
(AdamW's ``step``) are plain tensors, equal on every rank (an all-reduce over each sharding group fills
them in for parameters this rank owns nothing of). Which states are per element and which are scalars
is found once, by stepping the optimizer class on a two-element dummy (``probe_state_kinds``),
so a fresh optimizer's state dict already has every entry for ``ckpt`` to fill. ``load_state_dict``
also takes entries without ``master_param``: the masters are then taken from the parameters as they
are (for a caller that saves the weights once, as the model, and loads them first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pstate import Shard, comm

from .errors import DataParallelError

if TYPE_CHECKING:
    from .sharded_optimizer import ShardedOptimizer

MASTER = "master_param"


@dataclass(frozen=True)
class StateKind:
    """How an optimizer stores one state: per element of the parameter, or one (replicated) value."""

    per_element: bool
    is_tensor: bool
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    device: torch.device | None


def probe_state_kinds(
    optimizer_cls: type[torch.optim.Optimizer], options: list[dict[str, Any]], kwargs: dict[str, Any], device
) -> list[dict[str, StateKind]]:
    """For each param group's options, the states ``optimizer_cls`` creates in one step. Also the
    check that the options are accepted, before any work or communication starts."""
    kinds = []
    for number, group_options in enumerate(options):
        dummy = torch.zeros(2, device=device, requires_grad=True)
        try:
            optimizer = optimizer_cls([{"params": [dummy], **group_options}], **kwargs)
            dummy.grad = torch.zeros_like(dummy)
            optimizer.step()
        except (TypeError, ValueError, RuntimeError) as error:
            raise DataParallelError(
                f"{optimizer_cls.__name__} refused the options {kwargs} with param group {number}'s "
                f"{group_options}: {error}"
            ) from error
        found = {}
        for name, value in optimizer.state[dummy].items():
            if isinstance(value, torch.Tensor):
                per_element = tuple(value.shape) == tuple(dummy.shape)
                found[name] = StateKind(per_element, True, value.dtype, tuple(value.shape), value.device)
            else:
                found[name] = StateKind(False, False, None, (), None)
        kinds.append(found)
    return kinds


def build_state_dict(opt: ShardedOptimizer) -> dict[str, Any]:
    """The sharded state dict of ``opt`` (collective over its group: one all-reduce)."""
    scalars = _replicated_scalars(opt)
    state: dict[str | int, dict[str, Any]] = {}
    for group, kinds in zip(opt._groups, opt._kinds):
        for key, param in zip(group.keys, group.params):
            master = opt._masters.get(id(param))
            inner = opt.optimizer.state.get(master, {}) if master is not None else {}
            entry: dict[str, Any] = {}
            for name, kind in kinds.items():
                if kind.per_element:
                    data = inner.get(name)
                    if data is None:
                        dtype = opt._master_dtype(param)
                        data = torch.zeros(_owned_numel(opt, param), dtype=dtype, device=param.device)
                    entry[name] = _shard(opt, param, data.reshape(-1))
                else:
                    entry[name] = scalars[(key, name)]
            entry[MASTER] = _shard(opt, param, master)
            state[key] = entry
    groups = []
    for group, inner_group in zip(opt._groups, opt.optimizer.param_groups):
        options = {k: v for k, v in inner_group.items() if k != "params"}
        groups.append({**options, "params": list(group.keys)})
    result: dict[str, Any] = {"state": state, "param_groups": groups}
    if opt.loss_scaler is not None:
        result["loss_scaler"] = opt.loss_scaler.state_dict()
    return result


def load_state_dict(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Check all of ``state_dict`` against ``opt``, then load it (collective: parameters are all-gathered)."""
    _validate(opt, state_dict)
    for saved, inner_group in zip(state_dict["param_groups"], opt.optimizer.param_groups):
        for name, value in saved.items():
            if name != "params":
                current = inner_group.get(name)
                inner_group[name] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    with torch.no_grad():
        for group, kinds in zip(opt._groups, opt._kinds):
            for key, param in zip(group.keys, group.params):
                master = opt._masters.get(id(param))
                if master is None:
                    continue
                entry = state_dict["state"][key]
                if MASTER in entry:
                    master.copy_(entry[MASTER].data)
                else:  # the caller loaded the model's weights: the masters are their pieces
                    start, stop = _flat_range(opt, param)
                    master.copy_(param.detach().reshape(-1)[start:stop].to(master.dtype))
                inner = {}
                for name, kind in kinds.items():
                    value = entry[name]
                    if kind.per_element:
                        inner[name] = value.data.to(device=master.device, dtype=master.dtype).clone()
                    elif kind.is_tensor:
                        inner[name] = torch.as_tensor(value, dtype=kind.dtype, device=kind.device).reshape(kind.shape)
                        inner[name] = inner[name].clone()
                    else:
                        inner[name] = value.item() if isinstance(value, torch.Tensor) else value
                opt.optimizer.state[master] = inner
    if opt.loss_scaler is not None and "loss_scaler" in state_dict:
        opt.loss_scaler.load_state_dict(state_dict["loss_scaler"])
    opt._publish()


def _validate(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise DataParallelError("a ShardedOptimizer state dict is a mapping with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt._groups):
        raise DataParallelError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(opt._groups)}"
        )
    for number, (saved, group) in enumerate(zip(saved_groups, opt._groups)):
        if list(saved.get("params", [])) != list(group.keys):
            raise DataParallelError(
                f"param group {number} of the state dict holds {list(saved.get('params', []))}, "
                f"this optimizer's holds {list(group.keys)}"
            )
    for group, kinds in zip(opt._groups, opt._kinds):
        for key, param in zip(group.keys, group.params):
            entry = state_dict["state"].get(key)
            if entry is None:
                raise DataParallelError(f"the state dict has no state for parameter {key!r}")
            expected = _flat_range(opt, param)
            for name in (MASTER, *kinds) if MASTER in entry else kinds:
                if name not in entry:
                    raise DataParallelError(f"the state dict has no {name!r} for parameter {key!r}")
                if name != MASTER and not kinds[name].per_element:
                    continue
                shard = entry[name]
                if not isinstance(shard, Shard):
                    raise DataParallelError(f"{name!r} of parameter {key!r} must be a pstate.Shard")
                if shard.global_shape != tuple(param.shape) or shard.flat_range != expected:
                    raise DataParallelError(
                        f"{name!r} of parameter {key!r} covers elements {shard.flat_range} of a {shard.global_shape} "
                        f"tensor; this rank owns {expected} of {tuple(param.shape)}: fill the Shards of this "
                        "optimizer's own state_dict()"
                    )


def _replicated_scalars(opt: ShardedOptimizer) -> dict[tuple[Any, str], Any]:
    """Each scalar state of each parameter, taken from the ranks of its sharding group (the dense or the
    expert group) that own part of it: one all-reduce per group."""
    scalars = {}
    for part in opt._parts:
        slots, sums = [], []
        for group, kinds in zip(opt._groups, opt._kinds):
            for key, param in zip(group.keys, group.params):
                if opt.grads_of(param) is not part:
                    continue
                master = opt._masters.get(id(param))
                inner = opt.optimizer.state.get(master, {}) if master is not None else {}
                for name, kind in kinds.items():
                    if not kind.per_element:
                        slots.append((key, name, kind))
                        value = inner.get(name)
                        sums.append((0.0, 0.0) if value is None else (float(value), 1.0))
        host = torch.device("cpu") if opt._device.type == "meta" else opt._device  # a model of shapes alone
        values = torch.tensor(sums, dtype=torch.float64, device=host).reshape(-1, 2)
        if slots:
            comm.all_reduce(values, group=part.group)
        for (key, name, kind), (total, count) in zip(slots, values.tolist()):
            value = total / count if count else 0.0
            if kind.is_tensor:
                scalars[(key, name)] = torch.full(kind.shape, value, dtype=kind.dtype, device=kind.device)
            else:
                scalars[(key, name)] = value
    return scalars


def _flat_range(opt: ShardedOptimizer, param: torch.Tensor) -> tuple[int, int]:
    owned = opt.grads_of(param).owned(param)
    return (0, 0) if owned is None else (owned.start, owned.stop)


def _owned_numel(opt: ShardedOptimizer, param: torch.Tensor) -> int:
    start, stop = _flat_range(opt, param)
    return stop - start


def _shard(opt: ShardedOptimizer, param: torch.Tensor, data: torch.Tensor | None) -> Shard:
    shape = tuple(param.shape)
    if data is None:
        data = torch.zeros(0, dtype=opt._master_dtype(param), device=param.device)
    return Shard(data, shape, (0,) * len(shape), shape, _flat_range(opt, param))
