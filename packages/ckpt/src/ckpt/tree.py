"""Flattening a nested state dict into named leaves, and the ``PerRank`` wrapper.

A state is a nested dict. Its leaves are ``pstate.Shard`` (this rank's piece of a split tensor),
plain tensors (replicated: every rank holding the key holds the same value), ``PerRank`` (a value
that differs by rank, such as an RNG state) and JSON values (step, config, data position). Keys are
joined with ``/`` into one name per leaf, so a key may not contain ``/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pstate import Shard

from .errors import CheckpointError

SEP = "/"


@dataclass
class PerRank:
    """A leaf whose value differs by rank (``torch.get_rng_state()``, a rank's data position).

    Each rank saves its own value; on load rank ``r`` gets the value rank ``r`` saved. ``value`` is a
    tensor or a JSON value. With ``required=False`` a rank that has no saved value (the world grew)
    keeps its current value instead of failing.
    """

    value: Any
    required: bool = True


@dataclass
class Leaf:
    """One named leaf: its kind, the object, and where it sits (to replace it on load)."""

    kind: str  # "shard", "rank_tensor", "value" or "rank_value"
    obj: Any
    parent: dict
    key: Any

    def shard(self) -> Shard:
        """The leaf as a ``Shard`` (a plain tensor is the whole of itself)."""
        if isinstance(self.obj, Shard):
            return self.obj
        t = self.obj
        return Shard(t, tuple(t.shape), (0,) * t.dim())


def flatten(state: dict) -> dict[str, Leaf]:
    """Every leaf of ``state`` by its ``/``-joined name."""
    if not isinstance(state, dict):
        raise CheckpointError(f"the state must be a dict, got {type(state).__name__}")
    out: dict[str, Leaf] = {}
    _walk(state, "", out)
    return out


def _walk(node: dict, prefix: str, out: dict[str, Leaf]) -> None:
    for key, value in node.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise CheckpointError(f"key {key!r} under {prefix or 'the top level'!r} is not a str or int")
        if SEP in str(key):
            raise CheckpointError(f"key {key!r} under {prefix or 'the top level'!r} contains {SEP!r}")
        name = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            _walk(value, name, out)
        elif isinstance(value, (Shard, torch.Tensor)):
            out[name] = Leaf("shard", value, node, key)
        elif isinstance(value, PerRank):
            kind = "rank_tensor" if isinstance(value.value, torch.Tensor) else "rank_value"
            if kind == "rank_value":
                _check_plain(value.value, name)
            out[name] = Leaf(kind, value, node, key)
        else:
            _check_plain(value, name)
            out[name] = Leaf("value", value, node, key)


def _check_plain(value: Any, name: str) -> None:
    """A non-tensor leaf must be JSON: tensors inside lists or tuples cannot be placed."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, name)
    elif isinstance(value, dict):
        for item in value.values():
            _check_plain(item, name)
    elif isinstance(value, (torch.Tensor, Shard, PerRank)):
        raise CheckpointError(f"{name!r}: tensors inside a list or tuple are not supported; use a dict")
