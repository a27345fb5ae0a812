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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pstate import Shard, comm

from .errors import DataParallelError

MASTER = "master_param"


@dataclass(frozen=True)
class StateKind:
    """How an optimizer stores one state: per element of the parameter, or one (replicated) value."""

    per_element: bool
    is_tensor: bool
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    device: torch.device | None


@dataclass(frozen=True)
class ParamEntry:
    """One parameter as the state dict sees it: its ``key``, the states its optimizer keeps (``kinds``),
    this rank's ``master`` shard (``None``: it owns none of it), the elements ``flat_range`` of the
    flattened parameter that shard covers and the ``group`` it is sharded over."""

    key: str | int
    param: torch.Tensor
    kinds: Mapping[str, StateKind]
    master: torch.Tensor | None
    flat_range: tuple[int, int]
    group: dist.ProcessGroup

    @property
    def master_dtype(self) -> torch.dtype:
        return self.param.dtype if self.param.dtype.itemsize >= 4 else torch.float32


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


class ShardedState:
    """State dict and load of a sharded optimizer, from what it hands over at construction: ``entries`` in
    param-group order (``group_keys``: each param group's keys), the wrapped ``optimizer`` (its state is
    keyed by the masters), the ``loss_scaler``, the ``device`` and ``publish`` (copies the masters into
    the parameters and gathers them on every rank)."""

    def __init__(
        self,
        entries: Sequence[ParamEntry],
        group_keys: Sequence[Sequence[str | int]],
        optimizer: torch.optim.Optimizer,
        *,
        loss_scaler: Any,
        device: torch.device,
        publish: Callable[[], None],
    ) -> None:
        self.entries, self.group_keys, self.optimizer = list(entries), [list(k) for k in group_keys], optimizer
        self.loss_scaler, self.device, self.publish = loss_scaler, device, publish

    def state_dict(self) -> dict[str, Any]:
        """The sharded state dict (collective over the sharding groups: one all-reduce each)."""
        scalars = self._replicated_scalars()
        state: dict[str | int, dict[str, Any]] = {}
        for e in self.entries:
            inner = self.optimizer.state.get(e.master, {}) if e.master is not None else {}
            entry: dict[str, Any] = {}
            for name, kind in e.kinds.items():
                if kind.per_element:
                    data = inner.get(name)
                    if data is None:
                        numel = e.flat_range[1] - e.flat_range[0]
                        data = torch.zeros(numel, dtype=e.master_dtype, device=e.param.device)
                    entry[name] = _shard(e, data.reshape(-1))
                else:
                    entry[name] = scalars[(e.key, name)]
            entry[MASTER] = _shard(e, e.master)
            state[e.key] = entry
        groups = []
        for keys, inner_group in zip(self.group_keys, self.optimizer.param_groups):
            options = {k: v for k, v in inner_group.items() if k != "params"}
            groups.append({**options, "params": list(keys)})
        result: dict[str, Any] = {"state": state, "param_groups": groups}
        if self.loss_scaler is not None:
            result["loss_scaler"] = self.loss_scaler.state_dict()
        return result

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check all of ``state_dict``, then load it (collective: the parameters are gathered)."""
        self._validate(state_dict)
        for saved, inner_group in zip(state_dict["param_groups"], self.optimizer.param_groups):
            for name, value in saved.items():
                if name != "params":
                    current = inner_group.get(name)
                    as_tuple = isinstance(current, tuple) and isinstance(value, list)
                    inner_group[name] = tuple(value) if as_tuple else value
        with torch.no_grad():
            for e in self.entries:
                if e.master is None:
                    continue
                entry = state_dict["state"][e.key]
                if MASTER in entry:
                    e.master.copy_(entry[MASTER].data)
                else:  # the caller loaded the model's weights: the masters are their pieces
                    start, stop = e.flat_range
                    e.master.copy_(e.param.detach().reshape(-1)[start:stop].to(e.master.dtype))
                inner = {}
                for name, kind in e.kinds.items():
                    value = entry[name]
                    if kind.per_element:
                        inner[name] = value.data.to(device=e.master.device, dtype=e.master.dtype).clone()
                    elif kind.is_tensor:
                        inner[name] = torch.as_tensor(value, dtype=kind.dtype, device=kind.device).reshape(kind.shape)
                        inner[name] = inner[name].clone()
                    else:
                        inner[name] = value.item() if isinstance(value, torch.Tensor) else value
                self.optimizer.state[e.master] = inner
        if self.loss_scaler is not None and "loss_scaler" in state_dict:
            self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        self.publish()

    def full_masters(self) -> dict[int, torch.Tensor]:
        """The fp32 masters of the 16-bit parameters as whole tensors by ``id(param)``: each rank writes the
        range it owns into zeros and one all-reduce per sharding group sums them (checkpoint time only)."""
        by_group: dict[int, tuple[dist.ProcessGroup, list[ParamEntry]]] = {}
        for e in self.entries:
            if e.master_dtype != e.param.dtype:
                by_group.setdefault(id(e.group), (e.group, []))[1].append(e)
        out = {}
        for group, entries in by_group.values():
            flat = torch.zeros(sum(e.param.numel() for e in entries), dtype=torch.float32, device=self.device)
            at = 0
            for e in entries:
                start, stop = e.flat_range
                if e.master is not None:
                    flat[at + start : at + stop] = e.master
                out[id(e.param)] = flat[at : at + e.param.numel()].view(e.param.shape)
                at += e.param.numel()
            comm.all_reduce(flat, group=group)
        return out

    def load_full_masters(self, full: Mapping[int, torch.Tensor]) -> None:
        """Set the masters of the 16-bit parameters from ``full`` (whole tensors), then the parameters."""
        with torch.no_grad():
            for e in self.entries:
                if e.master is not None and e.master_dtype != e.param.dtype and id(e.param) in full:
                    e.master.copy_(full[id(e.param)].reshape(-1)[e.flat_range[0] : e.flat_range[1]])
        self.publish()

    def _validate(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise DataParallelError("a ShardedOptimizer state dict is a mapping with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.group_keys):
            raise DataParallelError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(self.group_keys)}"
            )
        for number, (saved, keys) in enumerate(zip(saved_groups, self.group_keys)):
            if list(saved.get("params", [])) != keys:
                raise DataParallelError(
                    f"param group {number} of the state dict holds {list(saved.get('params', []))}, "
                    f"this optimizer's holds {keys}"
                )
        for e in self.entries:
            entry = state_dict["state"].get(e.key)
            if entry is None:
                raise DataParallelError(f"the state dict has no state for parameter {e.key!r}")
            for name in (MASTER, *e.kinds) if MASTER in entry else e.kinds:
                if name not in entry:
                    raise DataParallelError(f"the state dict has no {name!r} for parameter {e.key!r}")
                if name != MASTER and not e.kinds[name].per_element:
                    continue
                shard = entry[name]
                if not isinstance(shard, Shard):
                    raise DataParallelError(f"{name!r} of parameter {e.key!r} must be a pstate.Shard")
                if shard.global_shape != tuple(e.param.shape) or shard.flat_range != e.flat_range:
                    raise DataParallelError(
                        f"{name!r} of parameter {e.key!r} covers elements {shard.flat_range} of a "
                        f"{shard.global_shape} tensor; this rank owns {e.flat_range} of {tuple(e.param.shape)}: "
                        "fill the Shards of this optimizer's own state_dict()"
                    )

    def _replicated_scalars(self) -> dict[tuple[Any, str], Any]:
        """Each scalar state of each parameter, taken from the ranks of its sharding group that own part
        of it: one all-reduce per group."""
        scalars = {}
        by_group: dict[int, tuple[dist.ProcessGroup, list[ParamEntry]]] = {}
        for e in self.entries:
            by_group.setdefault(id(e.group), (e.group, []))[1].append(e)
        for group, entries in by_group.values():
            slots, sums = [], []
            for e in entries:
                inner = self.optimizer.state.get(e.master, {}) if e.master is not None else {}
                for name, kind in e.kinds.items():
                    if not kind.per_element:
                        slots.append((e.key, name, kind))
                        value = inner.get(name)
                        sums.append((0.0, 0.0) if value is None else (float(value), 1.0))
            host = torch.device("cpu") if self.device.type == "meta" else self.device  # a model of shapes alone
            values = torch.tensor(sums, dtype=torch.float64, device=host).reshape(-1, 2)
            if slots:
                comm.all_reduce(values, group=group)
            for (key, name, kind), (total, count) in zip(slots, values.tolist()):
                value = total / count if count else 0.0
                if kind.is_tensor:
                    scalars[(key, name)] = torch.full(kind.shape, value, dtype=kind.dtype, device=kind.device)
                else:
                    scalars[(key, name)] = value
        return scalars


def _shard(e: ParamEntry, data: torch.Tensor | None) -> Shard:
    shape = tuple(e.param.shape)
    if data is None:
        data = torch.zeros(0, dtype=e.master_dtype, device=e.param.device)
    return Shard(data, shape, (0,) * len(shape), shape, e.flat_range)
