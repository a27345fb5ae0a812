"""Planning a save: which rank writes each distinct piece, and each rank's part of the index.

A piece (a leaf's rectangle or flat range) may be held by several ranks: a replicated tensor, the same
TP slice on every DP rank. It is written once. Its *holders* are the ranks holding an identical piece,
and the writer is chosen among them by a rule that depends only on the holders and the pieces they
share: within each holder set, pieces go largest first to the holder with the fewest bytes so far, so
replicated state is spread over the ranks instead of landing on rank 0. Every holder of a set holds
exactly the set's pieces, so each can compute the choice alone.

Two ways to know the holders. :func:`plan` (the exchange) finds them in every rank's ``describe``
document; :func:`local_plan` is told them by the caller, who derives them from the parallel layout
(``ckpt.save(replicas=...)``), and needs no document but its own. Both give the same ``Plan``; each rank's
``fragment`` (what it writes, its per-rank leaves) reaches rank 0, which :func:`assemble` s the index.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .tree import Leaf

KINDS = ("tensors", "rank_tensors", "values", "rank_values")
Piece = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int] | None]


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
    """This rank's share of a save: ``writes`` (leaf name, name in its file) and ``fragment``, its part
    of the index (the pieces it writes, its per-rank leaves, and on rank 0 the values)."""

    errors: list[str]
    writes: list[tuple[str, str]] = field(default_factory=list)
    fragment: dict[str, Any] = field(default_factory=lambda: {kind: {} for kind in KINDS})


def piece_of(name: str, meta: Mapping[str, Any]) -> Piece | None:
    """The identity of a described piece, or ``None`` when it is empty (nothing to save or load)."""
    flat = meta["flat_range"]
    numel = (flat[1] - flat[0]) if flat is not None else math.prod(meta["shape"])
    if numel == 0:
        return None
    return (name, tuple(meta["offsets"]), tuple(meta["shape"]), None if flat is None else tuple(flat))


def piece_bytes(piece: Piece, dtype: str) -> int:
    _, _, shape, flat = piece
    numel = (flat[1] - flat[0]) if flat is not None else math.prod(shape)
    return numel * parse_dtype(dtype).itemsize


def canonical(holders: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``holders`` with one tuple object per distinct holder set, so that sets can be told apart by
    identity: comparing or hashing a set costs its size, and a rank holds many pieces of a few sets."""
    by_id: dict[int, tuple[int, ...]] = {}
    by_value: dict[tuple[int, ...], tuple[int, ...]] = {}
    out = {}
    for name, ranks in holders.items():
        same = by_id.get(id(ranks))
        if same is None:
            same = by_id[id(ranks)] = by_value.setdefault(ranks, ranks)
        out[name] = same
    return out


class SetKey:
    """A holder set as a dictionary key by identity (see :func:`canonical`), ordered like its ranks."""

    __slots__ = ("ranks",)

    def __init__(self, ranks: tuple[int, ...]):
        self.ranks = ranks

    def __hash__(self) -> int:
        return id(self.ranks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SetKey) and other.ranks is self.ranks


def assign(pieces: Mapping[Any, list[tuple[Piece, int]]]) -> dict[Piece, int]:
    """The writer of each piece, from the pieces ``(piece, bytes)`` of each holder set (sorted ranks).

    Largest first, each piece goes to the holder with the fewest bytes so far (the lowest rank on a
    tie). Holders not yet given a piece have none, so they are taken in rank order before any other:
    the cost is the number of pieces (times a logarithm), not the size of the holder set."""
    writers: dict[Piece, int] = {}
    for key, members in pieces.items():
        holders = key.ranks if isinstance(key, SetKey) else key
        used: list[tuple[int, int]] = []  # (bytes, rank) of the holders given a piece, as a heap
        for piece, size in sorted(members, key=lambda m: (-m[1], m[0][0], m[0][1], m[0][2], m[0][3] or ())):
            if len(used) < len(holders):
                load, writer = 0, holders[len(used)]
            else:
                load, writer = heapq.heappop(used)
            heapq.heappush(used, (load + size, writer))
            writers[piece] = writer
    return writers


def plan(docs: list[dict], rank: int) -> Plan:
    """The save plan of ``rank`` from every rank's ``describe`` document (the exchange)."""
    errors = [f"rank {r}: {e}" for r, d in enumerate(docs) for e in d["errors"]]
    out = Plan(errors)
    kinds: dict[str, set[str]] = {}
    for d in docs:
        for kind in KINDS:
            for name in d[kind]:
                kinds.setdefault(name, set()).add(kind)
    for name, found in sorted(kinds.items()):
        if len(found) > 1:
            errors.append(f"{name!r} is saved as different kinds on different ranks: {sorted(found)}")
    values = _merge_values(docs, errors)
    if rank == 0:
        out.fragment["values"] = values
    heads: dict[str, tuple[str, list]] = {}
    holders: dict[Piece, list[int]] = {}
    for r, d in enumerate(docs):
        for name, meta in d["tensors"].items():
            head = heads.setdefault(name, (meta["dtype"], meta["global_shape"]))
            if head != (meta["dtype"], meta["global_shape"]):
                errors.append(
                    f"{name!r}: rank {r} holds {meta['dtype']} of global shape {tuple(meta['global_shape'])}, "
                    f"another rank {head[0]} of global shape {tuple(head[1])}"
                )
                continue
            piece = piece_of(name, meta)
            if piece is not None:
                holders.setdefault(piece, []).append(r)
    by_set: dict[tuple[int, ...], list[tuple[Piece, int]]] = {}
    for piece, ranks in holders.items():
        by_set.setdefault(tuple(ranks), []).append((piece, piece_bytes(piece, heads[piece[0]][0])))
    writers = assign(by_set)
    mine = [p for p, w in writers.items() if w == rank]
    _fill(out, docs[rank], mine, rank)
    return out


def local_plan(doc: dict, holders: Mapping[str, tuple[int, ...]], rank: int) -> Plan:
    """The save plan of ``rank`` from its own ``describe`` document and the holders of each of its
    tensor leaves (sorted ranks, including ``rank``), as the layout says; no other rank's document."""
    out = Plan([f"rank {rank}: {e}" for e in doc["errors"]])
    if rank == 0:
        out.fragment["values"] = dict(doc["values"])
    holders = canonical(holders)
    keys: dict[int, SetKey] = {}
    by_set: dict[SetKey, list[tuple[Piece, int]]] = {}
    for name, meta in doc["tensors"].items():
        piece = piece_of(name, meta)
        if piece is None:
            continue
        ranks = holders[name]
        key = keys.get(id(ranks))
        if key is None:
            i = bisect.bisect_left(ranks, rank)
            if i == len(ranks) or ranks[i] != rank:
                out.errors.append(f"rank {rank}: {name!r}: replicas {list(ranks)} do not include the rank holding it")
                continue
            key = keys[id(ranks)] = SetKey(ranks)
        by_set.setdefault(key, []).append((piece, piece_bytes(piece, meta["dtype"])))
    writers = assign(by_set)
    _fill(out, doc, [p for p, w in writers.items() if w == rank], rank)
    return out


def _fill(out: Plan, doc: dict, mine: list[Piece], rank: int) -> None:
    """This rank's writes and fragment: the pieces it writes (numbered per name in its file), its
    per-rank tensors and values."""
    counters: dict[str, int] = {}
    tensors = out.fragment["tensors"]
    for name, meta in sorted(doc["tensors"].items()):  # every leaf's head, so rank 0 checks them all
        tensors[name] = {"dtype": meta["dtype"], "global_shape": meta["global_shape"], "pieces": []}
    for piece in sorted(mine, key=lambda p: (p[0], p[1], p[2], p[3] or ())):
        name, offsets, shape, flat = piece
        i = counters[name] = counters.get(name, -1) + 1
        entry = {
            "file": file_name(rank),
            "name": f"{name}#{i}",
            "offsets": list(offsets),
            "shape": list(shape),
            "flat_range": None if flat is None else list(flat),
        }
        tensors[name]["pieces"].append(entry)
        out.writes.append((name, entry["name"]))
    for name, meta in sorted(doc["rank_tensors"].items()):
        entry = {"file": file_name(rank), "name": f"{name}@rank{rank}", **meta}
        out.fragment["rank_tensors"][name] = {str(rank): entry}
        out.writes.append((name, entry["name"]))
    for name, value in doc["rank_values"].items():
        out.fragment["rank_values"][name] = {str(rank): value}


def _merge_values(docs: list[dict], errors: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for r, d in enumerate(docs):
        for name, value in d["values"].items():
            if name not in values:
                values[name] = value
            elif values[name] != value:
                errors.append(
                    f"{name!r}: ranks hold different values ({values[name]!r} and {value!r} on rank {r}); "
                    "wrap a per-rank value in ckpt.PerRank"
                )
    return values


def assemble(fragments: list[dict]) -> tuple[dict[str, Any], list[str]]:
    """The index's ``tensors``, ``rank_tensors``, ``values`` and ``rank_values`` from every rank's
    fragment (rank 0's carries the values), and the conflicts found (a name of several kinds, a tensor
    of several dtypes or global shapes)."""
    body: dict[str, Any] = {kind: {} for kind in KINDS}
    errors: list[str] = []
    body["values"] = dict(fragments[0]["values"])
    kinds: dict[str, str] = {name: "values" for name in body["values"]}
    for r, frag in enumerate(fragments):
        for kind in ("tensors", "rank_tensors", "rank_values"):
            for name, part in frag[kind].items():
                if kinds.setdefault(name, kind) != kind:
                    errors.append(f"{name!r} is saved as different kinds on different ranks: {kinds[name]}, {kind}")
                    continue
                if kind != "tensors":
                    body[kind].setdefault(name, {}).update(part)
                    continue
                head = body["tensors"].setdefault(
                    name, {"dtype": part["dtype"], "global_shape": part["global_shape"], "pieces": []}
                )
                if (head["dtype"], head["global_shape"]) != (part["dtype"], part["global_shape"]):
                    errors.append(
                        f"{name!r}: rank {r} writes {part['dtype']} of global shape {tuple(part['global_shape'])}, "
                        f"another rank {head['dtype']} of global shape {tuple(head['global_shape'])}"
                    )
                    continue
                head["pieces"].extend(part["pieces"])
    for head in body["tensors"].values():
        head["pieces"].sort(key=lambda p: (p["offsets"], p["flat_range"] or [], p["shape"]))
    for kind in ("rank_tensors", "rank_values"):
        body[kind] = {name: dict(sorted(per.items(), key=lambda kv: int(kv[0]))) for name, per in body[kind].items()}
    return body, errors
