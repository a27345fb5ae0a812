"""The initial values of a model's pieces, drawn where they live: each named piece of
:func:`~trainer.model.shards.model_pieces` that declares an :class:`~trainer.model.pieces.Init` is drawn
from its tensor's seed (run seed, global layer, role), with :func:`~trainer.model.init.normal_piece` (only
the blocks that overlap this rank's piece) or as the small full tensor its ``full`` gives, sliced; so a rank
draws only its pieces (plus at most one block) and every layout holds the one-process model's values.
A piece whose ``Init`` has a ``fill`` (the MoE experts and shared expert, which ``moe_dispatch`` draws
expert by expert, streamed) is drawn by it, with the pieces drawn together with it. Pieces that declare
none keep what their module built (norms' ones, biases' zeros, the router ``moe_dispatch`` draws).
"""

from __future__ import annotations

import torch

from . import init
from .gpt import GPTChunk
from .shards import model_pieces


def draw_initial_pieces(chunks: list[GPTChunk], seed: int) -> None:
    """Fill the randomly initialised weights of ``chunks`` (built around placeholders) with their values."""
    with torch.no_grad():
        for piece in model_pieces(chunks):
            how, target = piece.init, piece.of(piece.param.data)
            if how is None or target.numel() == 0:
                continue
            if how.fill is not None:
                how.fill(seed)
                continue
            tensor_seed = init.tensor_seed(seed, how.layer, how.role)
            if how.full is not None:
                full = how.full(piece.global_shape, tensor_seed)
                target.copy_(full[tuple(slice(o, o + n) for o, n in zip(piece.offsets, target.shape))])
            else:
                init.normal_piece(piece.global_shape, how.std, tensor_seed, piece.offsets, target)
