"""Seeded, layout-invariant initial weights: every tensor is drawn whole from its own generator.

The seed of a tensor depends only on the run's seed, the global layer number and the tensor's role,
never on the rank or the layout. Every rank that holds a piece of a tensor draws the whole tensor and
keeps its piece, so a model built at any TP/PP/CP/EP layout holds exactly the pieces of the one-process
model built from the same seed (Megatron's CPU initialisation does the same).
"""

from __future__ import annotations

import math

import torch

ROLES = (
    "embedding",
    "position",
    "head",
    "q",
    "k",
    "v",
    "proj",
    "fc1",
    "gate",
    "up",
    "fc2",
    "router",
    "experts",
    "dropout",
)

EMBEDDING_LAYER = -1
"""The layer number used for tensors outside the transformer layers (embeddings, head)."""


def tensor_seed(seed: int, layer: int, role: str) -> int:
    """The seed of one tensor: a function of the run seed, the global layer number and the role only."""
    return (seed * 1_000_003 + (layer + 2) * 131 + ROLES.index(role)) % (2**63)


def normal(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """A float32 CPU tensor of ``shape`` drawn from N(0, std^2) with a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def output_std(std: float, num_layers: int) -> float:
    """GPT-2's smaller standard deviation for the projections that write into the residual stream."""
    return std / math.sqrt(2.0 * num_layers)


def interleave_for_tp(parts: list[torch.Tensor], tp: int) -> torch.Tensor:
    """Rows ordered so that an even split over ``tp`` gives rank ``r`` the ``r``-th slice of every part.

    A fused weight (q, k, v or gate, up) split over TP must hold, on rank ``r``, the ``r``-th slice of
    each part one after the other. With ``tp=1`` this is just the parts concatenated.
    """
    return torch.cat([piece for r in range(tp) for piece in (p.chunk(tp, 0)[r] for p in parts)])
