"""The few collectives ``ckpt`` needs: JSON documents among the ranks of a group, and fixed-size sums.

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

    def all_reduce_sum(self, values: list[int]) -> list[int]:
        """The element-wise sum of every rank's ``values`` (int64; a fixed-size exchange)."""
        if self.group is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.cpu().tolist()]

    def gather_json(self, doc: Any) -> list[Any] | None:
        """Every rank's ``doc`` on rank 0, in group rank order; ``None`` on the other ranks."""
        if self.group is None:
            return [json.loads(json.dumps(doc))]
        device = self._device()
        raw = json.dumps(doc).encode()
        longest = torch.tensor([len(raw)], dtype=torch.int64, device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
        padded = torch.zeros(int(longest) + 8, dtype=torch.uint8, device=device)
        padded[: 8 + len(raw)] = _bytes_tensor(len(raw).to_bytes(8, "little") + raw)
        parts = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        if parts is None:
            return None
        out = []
        for p in parts:
            data = p.cpu().numpy().tobytes()
            out.append(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")].decode()))
        return out

    def broadcast_json(self, doc: Any) -> Any:
        """Rank 0's ``doc`` on every rank."""
        if self.group is None:
            return json.loads(json.dumps(doc))
        device = self._device()
        raw = json.dumps(doc).encode() if self.rank == 0 else b""
        size = torch.tensor([len(raw)], dtype=torch.int64, device=device)
        src = dist.get_global_rank(self.group, 0)
        dist.broadcast(size, src=src, group=self.group)
        data = torch.zeros(int(size), dtype=torch.uint8, device=device)
        if self.rank == 0:
            data.copy_(_bytes_tensor(raw))
        dist.broadcast(data, src=src, group=self.group)
        return json.loads(data.cpu().numpy().tobytes().decode())

    def _device(self) -> torch.device:
        return device_for_backend(dist.get_backend(self.group))


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


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
