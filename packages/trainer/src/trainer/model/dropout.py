"""Dropout that draws the right masks under tensor, sequence and pipeline parallelism.

Each chunk holds one :class:`DropoutRNG` (a :class:`tp_layers.RNGTracker` per device) with two states, both seeded
from the run seed, the chunk's pipeline stage and the CP rank, so stages (and the CP ranks' parts of the
sequences) draw other masks than each other (from
the default generator, every stage would start from the same state and repeat the first stage's masks
in its own layers):

- ``"replicated"``, the same on every TP rank: for activations every TP rank holds whole (no sequence
  parallelism), whose replicas must stay equal. At one stage this matches the one-process model.
- ``"model-parallel"`` (``tp_layers.MODEL_PARALLEL``), different per TP rank: for this rank's sequence
  shard under sequence parallelism, so the shards get independent masks.

Recomputation restores the tracker's states (``tp_layers.recompute(..., tracker=)``), so a recomputed
forward draws the masks the first forward drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_layers import MODEL_PARALLEL, RNGTracker

from . import init
from .groups import ModelGroups

REPLICATED = "replicated"


class DropoutRNG:
    """The dropout generator states of pipeline stage ``stage`` on this TP rank: one
    :class:`~tp_layers.RNGTracker` per device the activations are on, made on first use."""

    def __init__(self, seed: int, groups: ModelGroups, stage: int) -> None:
        # each CP rank holds another part of the sequences: its own states, replicated ones included
        base = init.tensor_seed(seed, stage, "dropout") + groups.cp_rank * (groups.tp_size + 1)
        self.seeds = {REPLICATED: base, MODEL_PARALLEL: base + 1 + groups.tp_rank}
        self._trackers: dict[torch.device, RNGTracker] = {}

    def tracker(self, device: torch.device) -> RNGTracker:
        if device not in self._trackers:
            tracker = self._trackers[device] = RNGTracker(device)
            for name, seed in self.seeds.items():
                tracker.add(name, seed)
        return self._trackers[device]


class Dropout(nn.Module):
    """``nn.Dropout(p)`` drawing from ``rng``'s state for the activations' kind: ``sharded`` (this TP
    rank's sequence shard) or replicated over TP."""

    def __init__(self, p: float, rng: DropoutRNG, *, sharded: bool) -> None:
        super().__init__()
        self.p, self.rng, self.state = p, rng, MODEL_PARALLEL if sharded else REPLICATED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng.tracker(x.device).fork(self.state):
            return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, state={self.state!r}"
