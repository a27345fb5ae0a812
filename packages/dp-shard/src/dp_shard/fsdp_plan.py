"""Which FSDP unit holds which parameter: the units ``fully_shard`` is given, checked and resolved.

``units`` names submodules (a list of them, a module class or tuple of classes, or a predicate on
``(name, module)``); the root module is always a unit too, holding every parameter no other unit
claims. A parameter belongs to the innermost unit that contains the module it is an attribute of; a
shared (tied) parameter, an attribute of several modules, belongs to the innermost unit containing
all of them, because a unit's gathered copy lives exactly while that unit's forward runs and every
use of the parameter must happen inside it. Only trainable parameters are sharded; frozen ones stay
as they are on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DataParallelError

Units = Sequence[nn.Module] | type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None


@dataclass
class PlannedUnit:
    """A unit's module, its dotted name (``""`` for the root) and its parameters in order:
    ``(name, [(owner module, attribute), ...], parameter)``."""

    name: str
    module: nn.Module
    params: list[tuple[str, list[tuple[nn.Module, str]], nn.Parameter]] = field(default_factory=list)


def resolve_units(module: nn.Module, units: Units) -> list[PlannedUnit]:
    """The root followed by the chosen submodules, in the order ``module.named_modules()`` lists them."""
    named = list(module.named_modules())
    if units is None:
        chosen: list[tuple[str, nn.Module]] = []
    elif isinstance(units, type) or (isinstance(units, tuple) and all(isinstance(u, type) for u in units)):
        chosen = [(n, m) for n, m in named if n and isinstance(m, units)]
    elif callable(units) and not isinstance(units, nn.Module):
        chosen = [(n, m) for n, m in named if n and units(n, m)]
    elif isinstance(units, Sequence) and not isinstance(units, str):
        names = {id(m): n for n, m in named}
        picked: set[int] = set()
        for i, unit in enumerate(units):
            if not isinstance(unit, nn.Module):
                raise DataParallelError(f"units[{i}] is a {type(unit).__name__}, not a torch.nn.Module")
            if id(unit) not in names:
                raise DataParallelError(
                    f"units[{i}] ({type(unit).__name__}) is not a submodule of the "
                    f"{type(module).__name__} being sharded"
                )
            picked.add(id(unit))
        chosen = [(n, m) for n, m in named if n and id(m) in picked]
    else:
        raise DataParallelError(
            f"units must be a list of submodules, a module class, a tuple of classes or a predicate "
            f"(name, module) -> bool, got {type(units).__name__}"
        )
    return [PlannedUnit("", module)] + [PlannedUnit(n, m) for n, m in chosen]


def assign_parameters(module: nn.Module, units: list[PlannedUnit]) -> list[PlannedUnit]:
    """Fill each unit's parameters (trainable ones, each once, under its first name); return the units
    that hold any. Refuses a unit whose parameters have several dtypes or devices."""
    modules = dict(module.named_modules(remove_duplicate=False))
    by_name = {u.name: u for u in units}
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for full_name, param in module.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        path, _, attr = full_name.rpartition(".")
        params.setdefault(id(param), (full_name, param))
        seen = owners.setdefault(id(param), [])
        if all(m is not modules[path] or a != attr for _, m, a in seen):
            seen.append((path, modules[path], attr))
    for key, (name, param) in params.items():
        chains = [_enclosing_units(path, by_name) for path, _, _ in owners[key]]
        common = [u for u in chains[0] if all(u in chain for chain in chains[1:])]
        unit = by_name[max(common, key=len)]
        unit.params.append((name, [(m, a) for _, m, a in owners[key]], param))
    for unit in units:
        kinds = {(p.dtype, p.device) for _, _, p in unit.params}
        if len(kinds) > 1:
            found = sorted(f"{dtype} on {device}" for dtype, device in kinds)
            raise DataParallelError(
                f"unit {unit.name or '<root>'!r} holds parameters of several dtypes/devices {found}: a unit "
                "keeps one flat shard, so give those parameters units of their own"
            )
    return [u for u in units if u.params]


def _enclosing_units(path: str, by_name: dict[str, PlannedUnit]) -> list[str]:
    """The names of the units containing the module at ``path`` (the root ``""`` first)."""
    parts = path.split(".") if path else []
    prefixes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [p for p in prefixes if p in by_name]


def check_dtypes(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> None:
    for label, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise DataParallelError(f"{label}={dtype} must be a floating-point torch.dtype or None")
