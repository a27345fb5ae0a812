"""``load``: fill this rank's tensors from a checkpoint saved by any layout.

Each requested piece and each saved piece is reduced to boxes of the global tensor
(:mod:`ckpt.regions`); the requested boxes are filled from their intersections with the saved ones.
Everything is checked first (keys, dtypes, global shapes, coverage, the checksums of the files this
rank reads, paths), the ranks agree on the outcome, and only then is anything written, so a bad
checkpoint raises the same ``CheckpointError`` on every rank and leaves the state untouched.

Planning costs what this rank asks for: the saved boxes of a tensor are sorted along dimension 0 once
(:class:`ckpt.regions.BoxIndex`) and each requested box looks up only those it meets; the ranks agree
by summing one error count, and exchange messages only when something failed.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pstate import Group

from . import files
from .comm import comm_for
from .errors import CheckpointError
from .plan import dtype_name
from .regions import Box, BoxIndex, box_view, boxes, covers, local_slices
from .tree import SEP, Leaf, PerRank, flatten


@dataclass
class _Copy:
    """Copy ``shape`` at ``offsets`` (global frame) from a saved box into a requested box."""

    dst: torch.Tensor
    dst_box: Box
    file: str
    stored: str
    src_box: Box
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


def load(state: dict, path: str | os.PathLike, *, group: Group | None = None, verify: bool = True) -> dict:
    """Fill the tensors of ``state`` in place from the checkpoint at ``path``; collective over ``group``.

    ``state`` has the leaves :func:`ckpt.save` takes, described in the current layout: a ``Shard``
    receives the elements of its piece, a plain tensor the whole tensor, a ``PerRank`` what this rank
    saved, and a non-tensor leaf is replaced by the saved value. Saved keys absent from ``state`` are
    ignored (a pipeline stage loads only its layers). ``verify`` checks the checksum of every file
    read. Returns ``state``.
    """
    comm = comm_for(group)
    path = Path(path)
    copies: list[_Copy] = []
    values: list[tuple[Leaf, object]] = []
    errors: list[str] = []
    with files.reading(path) if path.is_dir() else ExitStack():
        try:
            index = files.read_index(path)
            for name in index["files"]:
                files.resolve_member(path, name)
            lookup: dict[str, BoxIndex] = {}
            for name, leaf in flatten(state).items():
                try:
                    _plan_leaf(index, name, leaf, comm.rank, copies, values, lookup)
                except CheckpointError as e:
                    errors.append(str(e))
            if verify and not errors:
                for name in sorted({c.file for c in copies}):
                    if name not in index["files"]:
                        raise CheckpointError(f"{path}: a piece names the file {name!r}, absent from the index")
                    files.verify_file(path, name, index["files"][name])
        except CheckpointError as e:
            errors.append(str(e))
        failed: list[str] = []
        if comm.all_reduce_sum([int(bool(errors))])[0]:
            everyone = comm.all_gather_json(errors)
            failed = [f"rank {r}: {e}" if comm.size > 1 else e for r, errs in enumerate(everyone) for e in errs]
        if failed:
            raise CheckpointError(f"cannot load {path}: " + "; ".join(failed))
        _run(path, copies)
    for leaf, value in values:
        leaf.parent[leaf.key] = value
    return state


def _plan_leaf(
    index: dict, name: str, leaf: Leaf, rank: int, copies: list[_Copy], values: list, lookup: dict[str, BoxIndex]
) -> None:
    if leaf.kind == "value":
        if name in index["values"]:
            values.append((leaf, index["values"][name]))
        elif (tree := _subtree(index["values"], name)) is not None:
            values.append((leaf, tree))  # a dict of values saved where the state now holds a placeholder
        else:
            raise CheckpointError(f"{name!r} is not in the checkpoint" + _elsewhere(index, name))
    elif leaf.kind == "rank_value":
        saved = index["rank_values"].get(name)
        if saved is None:
            raise CheckpointError(f"{name!r} is not in the checkpoint as a PerRank value" + _elsewhere(index, name))
        if str(rank) in saved:
            values.append((leaf, PerRank(saved[str(rank)], leaf.obj.required)))
        elif leaf.obj.required:
            raise CheckpointError(f"{name!r}: rank {rank} saved no value (saved by ranks {sorted(saved, key=int)})")
    elif leaf.kind == "rank_tensor":
        saved = index["rank_tensors"].get(name)
        if saved is None:
            raise CheckpointError(f"{name!r} is not in the checkpoint as a PerRank tensor" + _elsewhere(index, name))
        entry = saved.get(str(rank))
        if entry is None:
            if leaf.obj.required:
                raise CheckpointError(
                    f"{name!r}: rank {rank} saved no tensor (saved by ranks {sorted(saved, key=int)})"
                )
            return
        t = leaf.obj.value
        _check(name, t, entry["dtype"], entry["shape"], "shape")
        box = Box((0,) * t.dim(), tuple(t.shape))
        if box.numel:
            copies.append(_Copy(t, box, entry["file"], entry["name"], box, box.offsets, box.shape))
    else:
        head = index["tensors"].get(name)
        if head is None:
            raise CheckpointError(f"{name!r} is not in the checkpoint" + _elsewhere(index, name))
        shard = leaf.shard()
        _check(name, shard.data, head["dtype"], head["global_shape"], "global shape", shard.global_shape)
        if name not in lookup:
            lookup[name] = BoxIndex(
                [(p, b) for p in head["pieces"] for b in boxes(p["offsets"], p["shape"], p["flat_range"])]
            )
        _plan_shard(name, shard, lookup[name], copies)


def _plan_shard(name: str, shard, saved: BoxIndex, copies: list[_Copy]) -> None:
    for want in boxes(shard.offsets, shard.shape, shard.flat_range):
        found = saved.meeting(want)
        for piece, have, common in found:
            copies.append(_Copy(shard.data, want, piece["file"], piece["name"], have, *common))
        missing = covers(want, [common for _, _, common in found])
        if missing:
            raise CheckpointError(
                f"{name!r}: {missing} requested elements of the box at {want.offsets} of shape {want.shape} "
                "are not covered by any saved piece"
            )


def _check(name: str, t: torch.Tensor, dtype: str, saved_shape: list, what: str, shape: tuple | None = None) -> None:
    shape = tuple(t.shape) if shape is None else tuple(shape)
    if dtype_name(t.dtype) != dtype:
        raise CheckpointError(f"{name!r}: the checkpoint holds {dtype}, the state {dtype_name(t.dtype)}")
    if tuple(saved_shape) != shape:
        raise CheckpointError(f"{name!r}: the checkpoint's {what} is {tuple(saved_shape)}, the state's {shape}")


def _subtree(saved: dict, name: str) -> dict | None:
    """The values saved under ``name/...`` as a nested dict (string keys), or ``None``."""
    prefix = name + SEP
    tree: dict = {}
    for key, value in saved.items():
        if key.startswith(prefix):
            *parents, last = key[len(prefix) :].split(SEP)
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return tree or None


def _elsewhere(index: dict, name: str) -> str:
    for kind in ("tensors", "rank_tensors", "values", "rank_values"):
        if name in index[kind]:
            return f" (it is saved as {kind.removesuffix('s').replace('_', ' ')})"
    return ""


def _run(path: Path, copies: list[_Copy]) -> None:
    with ExitStack() as stack:
        opened = {}
        for c in copies:
            if c.file not in opened:
                target = files.resolve_member(path, c.file)
                try:
                    opened[c.file] = stack.enter_context(safe_open(str(target), framework="pt"))
                except Exception as e:
                    raise CheckpointError(f"cannot load {path}: safetensors cannot read {target} ({e})") from e
            try:
                src = _read(opened[c.file], c.stored, c.src_box, c.offsets, c.shape)
            except Exception as e:  # safetensors' own error types: name the file and the tensor
                raise CheckpointError(
                    f"cannot load {path}: data file {path / c.file} has no readable tensor {c.stored!r} "
                    f"({type(e).__name__}: {e})"
                ) from e
            box_view(c.dst, c.dst_box)[local_slices(c.dst_box, c.offsets, c.shape)].copy_(src)


def _read(f, name: str, box: Box, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The region ``(offsets, shape)`` of a saved box, reading only the rows it needs."""
    if box.flat is None and not shape:
        return f.get_tensor(name)
    stored = f.get_slice(name)
    if box.flat is None:
        return stored[local_slices(box, offsets, shape)]
    if not shape:
        return stored[box.flat : box.flat + 1][0]
    rel = [o - b for o, b in zip(offsets, box.offsets)]
    inner = 1
    for n in box.shape[1:]:
        inner *= n
    start = box.flat + rel[0] * inner
    rows = stored[start : start + shape[0] * inner].unflatten(0, (shape[0], *box.shape[1:]))
    return rows[(slice(None), *(slice(r, r + n) for r, n in zip(rel[1:], shape[1:])))]
