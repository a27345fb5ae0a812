"""The model's tensors as ``pstate.Shard`` pieces of the one-process model's tensors, by global name.

Names are layout-free (``layers.3.attn.q.weight``: layer numbers are global; fused tensors are split into
their logical parts; vocabulary padding is left out; the multi-token prediction modules are ``mtp.<k>.enorm``,
``mtp.<k>.hnorm``, ``mtp.<k>.proj`` and ``mtp.<k>.block.<as a layer>``), so a checkpoint written at one layout loads at
any other, and parity tests compare pieces against the one-process model's tensors directly.

Each layer declares its own pieces (its ``pieces(prefix)`` method, :mod:`.pieces`); :func:`model_pieces`
collects them and says where each named piece sits, in a parameter and in the full tensor; the
same pieces describe anything shaped like the parameters (gradients, optimizer moments), and a ZeRO
flat range of a parameter is split along them (:func:`flat_range_shards`). A column block (the experts'
``gate`` or ``up`` half of their fused first weight) of a flat range is a flat range of the block too,
but its elements are not contiguous in the parameter's: its data is then a copy, a :class:`Gathered`
whose :meth:`~Gathered.scatter` writes it back (after ``ckpt.load`` filled it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pstate import Shard

from .gpt import GPTChunk, named_blocks
from .pieces import Piece

__all__ = [
    "Gathered",
    "Piece",
    "assemble",
    "expert_bias_shards",
    "flat_range_shards",
    "gradient",
    "model_pieces",
    "model_shards",
    "weights_state",
]


def model_pieces(chunks: list[GPTChunk]) -> list[Piece]:
    """Every named piece of every parameter of ``chunks``, as their layers declare them (``pieces``)."""
    return [piece for chunk in chunks for piece in chunk.pieces()]


def expert_bias_shards(chunks: list[GPTChunk]) -> dict[str, Shard]:
    """The MoE routers' expert biases (buffers, not parameters: the optimizer never sees them), whole and
    replicated on every rank of their stage, by layout-free name (``layers.0.mlp.router.expert_bias``)."""
    out = {}
    for chunk in chunks:
        for prefix, layer in named_blocks(chunk):
            bias = layer.mlp.router.expert_bias if layer.is_moe else None
            if bias is not None:
                out[f"{prefix}.mlp.router.expert_bias"] = Shard(bias, tuple(bias.shape), (0,))
    return out


def weights_state(chunks: list[GPTChunk]) -> dict[str, dict[str, Shard]]:
    """What running the model needs from a checkpoint (generation, serving): ``model`` (its tensors) and,
    when its routers have them, ``expert_bias``."""
    state = {"model": model_shards(chunks)}
    if biases := expert_bias_shards(chunks):
        state["expert_bias"] = biases
    return state


def _value(p: nn.Parameter) -> torch.Tensor:
    return p.data


def gradient(p: nn.Parameter) -> torch.Tensor:
    """``p``'s gradient: its ``main_grad`` (set by ``dp_shard.DataParallel``) or ``.grad``, which is
    created as zeros when backward gave it none (so collectives over it still match on every rank)."""
    grad = getattr(p, "main_grad", None)
    if grad is None:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
    return grad


def model_shards(chunks: list[GPTChunk], *, grads: bool = False) -> dict[str, Shard]:
    """Every tensor of ``chunks`` (or its gradient, with ``grads=True``) as pieces of the full model's."""
    source: Callable[[nn.Parameter], torch.Tensor] = gradient if grads else _value
    return {piece.name: piece.shard(source(piece.param)) for piece in model_pieces(chunks)}


@dataclass(frozen=True)
class Gathered:
    """A column block's elements of a flat range: ``data``, copied from the ``[start, stop)``
    ``segments`` of ``source`` (one per expert), in order."""

    data: torch.Tensor
    source: torch.Tensor
    segments: tuple[tuple[int, int], ...]

    def scatter(self) -> None:
        """Write ``data`` back into ``source`` (after it was loaded)."""
        offset = 0
        for start, stop in self.segments:
            self.source[start:stop].copy_(self.data[offset : offset + stop - start])
            offset += stop - start


def flat_range_shards(pieces: list[Piece], local: Shard, gathered: list[Gathered] | None = None) -> dict[str, Shard]:
    """Split ``local``, a flat range of one parameter in its own frame (a ZeRO shard), along the
    parameter's ``pieces`` into flat ranges of each named full tensor's pieces. A column block piece is
    taken only with ``gathered``: where its data is a copy, the :class:`Gathered` is appended there."""
    out = {}
    for piece in pieces:
        if piece.dim1 is not None:
            if gathered is None:
                raise ValueError(f"{piece.name}: a column block of a ZeRO flat range needs gathered=")
            out[piece.name] = _column_block(piece, local, gathered)
            continue
        row = math.prod(local.shape[1:])
        first, last = piece.rows if piece.rows is not None else (0, local.shape[0])
        start, stop = max(local.flat_range[0], first * row), min(local.flat_range[1], last * row)
        shape = (last - first, *local.shape[1:])
        if start >= stop:
            start = stop = first * row
        data = local.data[start - local.flat_range[0] : stop - local.flat_range[0]]
        flat = (start - first * row, stop - first * row)
        out[piece.name] = Shard(data, piece.global_shape, piece.offsets, shape=shape, flat_range=flat)
    return out


def _column_block(piece: Piece, local: Shard, gathered: list[Gathered]) -> Shard:
    """The elements of columns ``piece.dim1`` (of dimension 1) in ``local``'s flat range, as a flat range of
    the block: within each index of dimension 0 they are contiguous, and the block's flat range runs on
    from one to the next, so the range is contiguous in the block, not in the parameter."""
    if piece.rows is not None:
        raise ValueError(f"{piece.name}: a piece of rows and columns cannot take a ZeRO flat range")
    shape, (first, last) = local.shape, piece.dim1
    inner = math.prod(shape[2:])
    row, width = shape[1] * inner, (last - first) * inner  # per index of dimension 0: all, and the block's

    def within(flat: int) -> int:  # elements of the block before the parameter's element ``flat``
        return flat // row * width + min(max(flat % row - first * inner, 0), width)

    low, high = local.flat_range
    segments = []
    for index in range(low // row, -(-high // row)):
        start, stop = max(low, index * row + first * inner), min(high, index * row + last * inner)
        if start < stop:
            segments.append((start - low, stop - low))
    if len(segments) <= 1:  # contiguous: a view
        start, stop = segments[0] if segments else (0, 0)
        data = local.data[start:stop]
    else:
        data = torch.cat([local.data[start:stop] for start, stop in segments])
        gathered.append(Gathered(data, local.data, tuple(segments)))
    block = (shape[0], last - first, *shape[2:])
    return Shard(data, piece.global_shape, piece.offsets, shape=block, flat_range=(within(low), within(high)))


def assemble(pieces: list[Shard]) -> torch.Tensor:
    """The full tensor from rectangular pieces of it (NaN, or the dtype's ``0``, where none covers it)."""
    first = pieces[0]
    fill = float("nan") if first.data.is_floating_point() else 0
    full = torch.full(first.global_shape, fill, dtype=first.data.dtype)
    for s in pieces:
        if s.flat_range is not None:
            raise ValueError("assemble: flat-range pieces are not supported")
        full[tuple(slice(o, o + n) for o, n in zip(s.offsets, s.shape))] = s.data.cpu()
    return full
