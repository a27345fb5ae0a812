"""Reading the ``params`` argument of an optimizer: tensors, ``(name, tensor)`` pairs or param-group dicts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DataParallelError


@dataclass
class ParamGroup:
    """One param group: its trainable parameters with their state-dict keys, and its hyperparameters."""

    params: list[torch.nn.Parameter] = field(default_factory=list)
    keys: list[str | int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def read_param_groups(params: Iterable[Any]) -> list[ParamGroup]:
    """The groups of ``params`` as torch optimizers accept them.

    Keys are the names when ``(name, tensor)`` pairs were given (all or none), else each parameter's
    index in the order given (as in ``torch.optim.Optimizer.state_dict``). Parameters that do not
    require grad are left out (they would never be stepped); a parameter given twice is an error.
    """
    if isinstance(params, torch.Tensor):
        raise DataParallelError(
            "params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, not one tensor"
        )
    items = list(params)
    if not items:
        raise DataParallelError("params is empty: there are no parameters to optimize")
    dicts = [isinstance(item, dict) for item in items]
    if any(dicts) and not all(dicts):
        raise DataParallelError("params mixes param-group dicts with tensors: give one form")
    raw = [dict(item) for item in items] if all(dicts) else [{"params": items}]
    groups, seen, named, index = [], {}, set(), 0
    for number, entry in enumerate(raw):
        if "params" not in entry:
            raise DataParallelError(f"param group {number} has no 'params' entry")
        members = entry.pop("params")
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        group = ParamGroup(options=entry)
        for item in members:
            name, tensor = _split(item, number)
            named.add(name is not None)
            if id(tensor) in seen:
                raise DataParallelError(
                    f"a parameter appears twice (param groups {seen[id(tensor)]} and {number}): give each once"
                )
            seen[id(tensor)] = number
            if tensor.requires_grad:
                if not tensor.is_floating_point():
                    raise DataParallelError(f"parameter {name or index} has dtype {tensor.dtype}: not floating point")
                group.params.append(tensor)
                group.keys.append(index if name is None else name)
            index += 1
        groups.append(group)
    if len(named) > 1:
        raise DataParallelError("params mixes (name, tensor) pairs with bare tensors: name all of them or none")
    if not any(g.params for g in groups):
        raise DataParallelError("no trainable parameters: every parameter given has requires_grad=False")
    return groups


def _split(item: Any, number: int) -> tuple[str | None, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return None, item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor):
        return item
    raise DataParallelError(
        f"param group {number} holds a {type(item).__name__}: expected tensors or (name, tensor) pairs"
    )
