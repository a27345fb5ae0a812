"""Seeded, layout-invariant initial weights, drawn piece by piece.

The seed of a tensor depends only on the run's seed, the global layer number and the tensor's role,
never on the rank or the layout. A tensor is drawn in blocks of whole rows of at most
:data:`BLOCK_BYTES`, block ``b`` from its own generator (seeded with :func:`block_seed`), so a rank
draws only the blocks that overlap its piece (:func:`normal_piece`) and holds at most one block beside
its pieces; a model built at any TP/PP/CP/EP layout holds exactly the pieces of the one-process model
built from the same seed. A tensor of one block draws what one generator seeded with the tensor's seed
draws (:func:`normal`). Layers are built around zero-stride placeholders (:func:`placeholder`: the
parallel layers slice the full weight they are given, which then allocates only this rank's slice),
and the pieces are drawn afterwards.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import ModelConfig

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
    "q_down",
    "q_up",
    "kv_down",
    "kv_up",
    "z",
    "x",
    "B",
    "C",
    "dt",
    "out_proj",
    "conv_x",
    "conv_B",
    "conv_C",
    "dt_bias",
    "eh_proj",
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


BLOCK_BYTES = 64 * 2**20
"""The most a rank holds of a tensor beyond its own piece while drawing it (float32)."""


def block_seed(seed: int, block: int) -> int:
    """The seed of row block ``block`` of the tensor seeded with ``seed`` (block 0: ``seed`` itself)."""
    return seed if block == 0 else (seed * 2_654_435_761 + block * 40_503 + 1) % (2**63)


def normal_piece(shape: tuple[int, int], std: float, seed: int, offsets: tuple[int, int], out: torch.Tensor) -> None:
    """Fill ``out`` with the block at ``offsets`` of the 2-D tensor ``shape`` drawn from N(0, std^2) in row
    blocks (see the module): only the blocks that overlap it are drawn, one at a time."""
    rows, cols = shape
    per_block = max(1, BLOCK_BYTES // 4 // cols)
    first, last = offsets[0], offsets[0] + out.size(0)
    for block in range(first // per_block, -(-last // per_block)):
        start = block * per_block
        drawn = torch.empty(min(per_block, rows - start), cols).normal_(
            0.0, std, generator=torch.Generator().manual_seed(block_seed(seed, block))
        )
        lo, hi = max(first, start), min(last, start + drawn.size(0))
        out[lo - first : hi - first] = drawn[lo - start : hi - start, offsets[1] : offsets[1] + out.size(1)]
        del drawn


def placeholder(shape: tuple[int, ...]) -> torch.Tensor:
    """A zero tensor of ``shape`` that takes no memory (zero strides); slicing and cloning it allocates
    only the slice."""
    return torch.zeros(()).expand(shape)


def output_std(cfg: ModelConfig) -> float:
    """GPT-2's smaller standard deviation for the projections that write into the residual stream:
    ``init_std / sqrt(2 * layers)``."""
    return cfg.init_std / math.sqrt(2.0 * cfg.layers)


def interleave_for_tp(parts: list[torch.Tensor], tp: int) -> torch.Tensor:
    """Rows ordered so that an even split over ``tp`` gives rank ``r`` the ``r``-th slice of every part.

    A fused weight (q, k, v or gate, up) split over TP must hold, on rank ``r``, the ``r``-th slice of
    each part one after the other. With ``tp=1`` this is just the parts concatenated.
    """
    return torch.cat([piece for r in range(tp) for piece in (p.chunk(tp, 0)[r] for p in parts)])
