"""A GPT chunk cut at its MoE layers' all-to-alls, for the pipeline executor's overlapped pairs
(``train.moe_overlap``): :func:`staged_run` gives one microbatch's :class:`moe_dispatch.StagedRun`.

The values between pieces are ``(documents, hidden)`` with packed documents and ``(hidden,)`` without:
every piece acts on the last value and carries the documents in front. A transformer layer whose MLP is
an all-to-all MoE layer is cut into attention (with the pre-MLP norm), the MoE layer's own pieces, and
the residual; any other layer, the embedding and the head are compute pieces. Dropout, full recompute,
MTP and hybrid layers are refused by the trainer's checks (see ``train.moe_overlap``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_dispatch import AllToAllDispatcher, Compute, MoELayer, StagedRun, chain
from moe_dispatch.overlap import Stage

from ..errors import TrainerError

if TYPE_CHECKING:
    from .block import TransformerLayer
    from .gpt import GPTChunk

Values = tuple[torch.Tensor, ...]


def _documents(v: Values) -> torch.Tensor | None:
    return v[0] if len(v) == 2 else None


def layer_pieces(layer: TransformerLayer) -> list[Stage]:
    """``(*carry, x) -> (*carry, layer(x))``, cut at the MoE layer's all-to-alls when it has them."""
    moe = layer.mlp
    if not (isinstance(moe, MoELayer) and isinstance(moe.dispatcher, AllToAllDispatcher)):
        return [Compute(lambda v: (*v[:-1], layer(v[-1], None, _documents(v))), f"layer{layer.layer}")]

    def attention(v: Values) -> Values:
        x = v[-1]
        h = x + layer.dropout(layer.attn(layer.norm1(x), None, _documents(v)))
        return (*v[:-1], h, layer.norm2(h))

    def residual(v: Values) -> Values:
        return (*v[:-2], v[-2] + layer.dropout(v[-1]))

    return chain(Compute(attention, "attention"), moe.stages(), Compute(residual, "residual"))


def staged_run(chunk: GPTChunk) -> StagedRun:
    """One microbatch through ``chunk`` in pieces; the run's inputs and outputs are the chunk's
    (``(ids or hidden[, documents])`` in; ``(logits,)`` or ``(hidden[, documents])`` out)."""
    if chunk.mtp is not None or chunk.cfg.layer_pattern is not None:
        raise TrainerError("train.moe_overlap: chunks with MTP modules or hybrid layers cannot be cut")

    def prologue(v: Values) -> Values:
        x, documents = v[0], (v[1] if len(v) > 1 else None)
        h = chunk.embed(x, None, documents) if chunk.stage.embedding else x
        return (h,) if documents is None else (documents, h)

    def epilogue(v: Values) -> Values:
        h, documents = v[-1], _documents(v)
        if chunk.stage.head:
            return (chunk.logits(chunk.final_norm(h)),)
        return (h,) if documents is None else (h, documents)

    pieces = chain(
        Compute(prologue, "embedding"),
        *(layer_pieces(layer) for layer in chunk.layers),
        Compute(epilogue, "head"),
    )
    return StagedRun(pieces)
