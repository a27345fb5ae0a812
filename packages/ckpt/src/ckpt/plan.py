"""Planning a save: what every rank holds, which rank writes each distinct piece, and the index body.

Every rank describes its leaves (no data), the descriptions are exchanged, and each rank computes
the same plan from them: inconsistent keys are refused before anything is written, a piece held by
several ranks (a replicated tensor, the same TP slice on every DP rank) is written once, and those
writes go to the holder with the fewest bytes so far, largest pieces first, so replicated state is
spread over the ranks instead of landing on rank 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .tree import Leaf


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def file_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def describe(leaves: dict[str, Leaf]) -> dict:
    """This rank's leaves as JSON: tensor metadata (no data) and the non-tensor values."""
    doc: dict[str, Any] = {"tensors": {}, "rank_tensors": {}, "values": {}, "rank_values": {}, "errors": []}
    for name, leaf in leaves.items():
        if leaf.kind == "shard":
            s = leaf.shard()
            doc["tensors"][name] = {
                "dtype": dtype_name(s.data.dtype),
                "global_shape": list(s.global_shape),
                "offsets": list(s.offsets),
                "shape": list(s.shape),
                "flat_range": None if s.flat_range is None else list(s.flat_range),
            }
        elif leaf.kind == "rank_tensor":
            t = leaf.obj.value
            doc["rank_tensors"][name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        else:
            value = leaf.obj.value if leaf.kind == "rank_value" else leaf.obj
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError) as e:
                doc["errors"].append(f"{name!r}: the value is not JSON ({e})")
                continue
            doc[leaf.kind + "s"][name] = value
    return doc


@dataclass
class Plan:
    """The same on every rank, except ``writes``: what this rank writes (leaf name, name in its file)."""

    errors: list[str]
    tensors: dict[str, dict] = field(default_factory=dict)
    rank_tensors: dict[str, dict] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    rank_values: dict[str, dict] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)


def plan(docs: list[dict], rank: int) -> Plan:
    """The save plan from every rank's ``describe`` document."""
    errors = [f"rank {r}: {e}" for r, d in enumerate(docs) for e in d["errors"]]
    out = Plan(errors)
    kinds: dict[str, set[str]] = {}
    for d in docs:
        for kind in ("tensors", "rank_tensors", "values", "rank_values"):
            for name in d[kind]:
                kinds.setdefault(name, set()).add(kind)
    for name, found in sorted(kinds.items()):
        if len(found) > 1:
            errors.append(f"{name!r} is saved as different kinds on different ranks: {sorted(found)}")
    _plan_values(docs, out)
    _plan_tensors(docs, out, rank)
    for r, d in enumerate(docs):
        for name, meta in sorted(d["rank_tensors"].items()):
            entry = {"file": file_name(r), "name": f"{name}@rank{r}", **meta}
            out.rank_tensors.setdefault(name, {})[str(r)] = entry
            if r == rank:
                out.writes.append((name, entry["name"]))
    return out


def _plan_values(docs: list[dict], out: Plan) -> None:
    for r, d in enumerate(docs):
        for name, value in d["values"].items():
            if name not in out.values:
                out.values[name] = value
            elif out.values[name] != value:
                out.errors.append(
                    f"{name!r}: ranks hold different values ({out.values[name]!r} and {value!r} on rank {r}); "
                    "wrap a per-rank value in ckpt.PerRank"
                )
        for name, value in d["rank_values"].items():
            out.rank_values.setdefault(name, {})[str(r)] = value


def _plan_tensors(docs: list[dict], out: Plan, rank: int) -> None:
    holders: dict[tuple, list[int]] = {}
    for r, d in enumerate(docs):
        for name, meta in d["tensors"].items():
            head = out.tensors.setdefault(
                name, {"dtype": meta["dtype"], "global_shape": meta["global_shape"], "pieces": []}
            )
            if (head["dtype"], head["global_shape"]) != (meta["dtype"], meta["global_shape"]):
                out.errors.append(
                    f"{name!r}: rank {r} holds {meta['dtype']} of global shape {tuple(meta['global_shape'])}, "
                    f"another rank {head['dtype']} of global shape {tuple(head['global_shape'])}"
                )
                continue
            flat = meta["flat_range"]
            numel = (flat[1] - flat[0]) if flat is not None else math.prod(meta["shape"])
            if numel == 0:
                continue  # an empty piece holds nothing to save or load
            piece = (name, tuple(meta["offsets"]), tuple(meta["shape"]), None if flat is None else tuple(flat))
            holders.setdefault(piece, []).append(r)
    load = [0] * len(docs)

    def size(piece: tuple) -> int:
        name, _, shape, flat = piece
        numel = (flat[1] - flat[0]) if flat is not None else math.prod(shape)
        return numel * parse_dtype(out.tensors[name]["dtype"]).itemsize

    counters: dict[str, int] = {}
    for piece in sorted(holders, key=lambda p: (-size(p), p[0], p[1], p[2], p[3] or ())):
        writer = min(holders[piece], key=lambda r: (load[r], r))
        load[writer] += size(piece)
        name, offsets, shape, flat = piece
        i = counters[name] = counters.get(name, -1) + 1
        entry = {
            "file": file_name(writer),
            "name": f"{name}#{i}",
            "offsets": list(offsets),
            "shape": list(shape),
            "flat_range": None if flat is None else list(flat),
        }
        out.tensors[name]["pieces"].append(entry)
        if writer == rank:
            out.writes.append((name, entry["name"]))
    for head in out.tensors.values():
        head["pieces"].sort(key=lambda p: (p["offsets"], p["flat_range"] or []))
