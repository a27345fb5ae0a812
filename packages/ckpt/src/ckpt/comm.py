"""The few collectives ``ckpt`` needs: exchanging small JSON documents among the ranks of a group.

Nothing is pickled: documents travel as UTF-8 JSON in byte tensors. Without an initialised default
group, ``group=None`` means a single process (world size 1), so ``save``/``load`` work in scripts too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pstate import Group, as_group
from pstate.device import device_for_backend


@dataclass(frozen=True)
class Comm:
    """A process group (``None`` for a single process), this rank's index in it and its size."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    def all_gather_json(self, doc: Any) -> list[Any]:
        """Every rank's ``doc``, in group rank order."""
        if self.group is None:
            return [json.loads(json.dumps(doc))]
        device = device_for_backend(dist.get_backend(self.group))
        data = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], device=device), group=self.group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: data.numel()] = data
        parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return [json.loads(bytes(p[: int(s)].cpu().tolist()).decode()) for p, s in zip(parts, sizes)]


def comm_for(group: Group | None) -> Comm:
    """The ``Comm`` of ``group``: the default group when ``None`` and one is initialised."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return Comm(None, 0, 1)
        pg = dist.group.WORLD
    else:
        pg = as_group(group)
    return Comm(pg, dist.get_rank(pg), dist.get_world_size(pg))


def cpu_comm(comm: Comm) -> Comm:
    """A new gloo group over the same ranks (a collective call), for work done off the calling thread."""
    if comm.group is None:
        return comm
    pg = dist.new_group(dist.get_process_group_ranks(comm.group), backend="gloo")
    return Comm(pg, comm.rank, comm.size)
