"""Wrap-time check that every rank of a group holds the same parameters (names, shapes, dtypes)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pstate import comm

from .errors import DataParallelError

Signature = list[tuple[str, tuple[int, ...], str]]


def check_same_parameters(named: Sequence[tuple[str, torch.nn.Parameter]], group: dist.ProcessGroup) -> None:
    """Raise :class:`DataParallelError` on every rank of ``group`` unless all ranks hold the same
    parameters. Costs one all-reduce of two integers (a digest, MAX of it and of its negation); only
    when they differ are the full signatures gathered to name the first difference."""
    signature: Signature = [(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in named]
    digest = int.from_bytes(hashlib.sha256(repr(signature).encode()).digest()[:7], "little")
    device = named[0][1].device
    device = torch.device("cpu") if device.type == "meta" else device  # a model built from shapes alone
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    comm.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if extremes[0].item() == -extremes[1].item():
        return
    gathered: list[Signature | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, signature, group=group)
    ranks = dist.get_process_group_ranks(group)
    raise DataParallelError(_describe(gathered, ranks))


def _describe(signatures: Sequence[Signature | None], ranks: Sequence[int]) -> str:
    first = signatures[0] or []
    for rank, other in zip(ranks[1:], signatures[1:]):
        other = other or []
        if other == first:
            continue
        head = f"the ranks of the data-parallel group {list(ranks)} hold different parameters: "
        for mine, theirs in zip(first, other):
            if mine != theirs:
                return head + f"rank {rank} has {_entry(theirs)} where rank {ranks[0]} has {_entry(mine)}"
        return head + f"rank {rank} has {len(other)} trainable parameters, rank {ranks[0]} has {len(first)}"
    return "the ranks of the data-parallel group hold different parameters"


def _entry(item: tuple[str, tuple[int, ...], str]) -> str:
    name, shape, dtype = item
    return f"{name!r} of shape {list(shape)} and dtype {dtype}"
