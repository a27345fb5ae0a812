"""What each layer declares about its tensors: :class:`Piece`, and the helpers the layers declare with.

A layer's ``pieces(prefix)`` method lists, for each of its parameters, the named tensors of the
one-process model it holds a part of: the layout-free name, the full tensor's global shape, this rank's
offsets in it, where the part sits in the parameter (rows, or a column block), how its initial values
are drawn (:class:`Init`) and, for a part of a tensor that the one-process model stores fused with
others (GPT-2's ``c_attn``, Mamba-2's ``in_proj``), which rows of that fused tensor it is
(:class:`Fused`). Checkpoint names (:mod:`.shards`), sharded initialization (:mod:`.seeded`) and the
Hugging Face conversion (:mod:`trainer.hf`) read only these declarations, so adding a layer type means
writing its ``pieces`` beside its parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from pstate import Shard


@dataclass(frozen=True)
class Init:
    """The initial values of a tensor: N(0, ``std``^2) drawn in seeded blocks from the tensor seed of
    (run seed, global ``layer``, ``role``) (see :mod:`.init`); with ``full``, the small full tensor
    ``full(global_shape, tensor_seed)`` of which each rank keeps its slice; with ``fill``, what
    ``fill(run seed)`` sets, which draws this rank's part of this tensor and of the others its module draws
    with it (their pieces then declare none)."""

    layer: int
    role: str
    std: float = 0.0
    full: Callable[[tuple[int, ...], int], torch.Tensor] | None = None
    fill: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Fused:
    """The tensor is rows ``[first, first + rows)`` of ``name`` (of ``global_shape``) in the one-process
    model's fused layout, the layout some file formats store."""

    name: str
    global_shape: tuple[int, ...]
    first: int


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (along dimension 0; all of them when ``None``) of ``param`` are the full tensor
    ``name``'s part at ``offsets`` of ``global_shape``; ``dim1`` selects a column block instead for the
    experts' fused ``[gate; up]`` dimension. ``init``: how its values are drawn (``None``: as the module
    builds it, a norm's ones or a bias's zeros); ``fused``: see :class:`Fused`."""

    name: str
    param: nn.Parameter
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: tuple[int, int] | None = None
    dim1: tuple[int, int] | None = None
    init: Init | None = None
    fused: Fused | None = None

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor`` (the parameter or anything of its shape), as a view."""
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        if self.dim1 is not None:
            tensor = tensor[:, self.dim1[0] : self.dim1[1]]
        return tensor

    def shard(self, tensor: torch.Tensor) -> Shard:
        return Shard(self.of(tensor), self.global_shape, self.offsets)


def whole(name: str, p: nn.Parameter, init: Init | None = None) -> Piece:
    """A parameter every rank holds whole."""
    return Piece(name, p, tuple(p.shape), (0,) * p.dim(), init=init)


def module_pieces(prefix: str, module: nn.Module) -> list[Piece]:
    """Every parameter of ``module`` (a norm), whole, as built."""
    return [whole(f"{prefix}.{name}", p) for name, p in module.named_parameters()]


def vocab_rows(name: str, p: nn.Parameter, vocab: int, rank: int, init: Init) -> Piece:
    """This rank's rows of the vocabulary, without the padding rows past ``vocab``."""
    rows = p.size(0)
    start = rank * rows
    valid = max(0, min(rows, vocab - start))
    return Piece(name, p, (vocab, p.size(1)), (min(start, vocab), 0), rows=(0, valid), init=init)


def fused_rows(
    prefix: str,
    linear: nn.Module,
    sizes: dict[str, int],
    rank: int,
    tp: int,
    inits: dict[str, Init] | None = None,
    fused: str | None = None,
) -> list[Piece]:
    """A column-parallel weight (and bias) holding, on this rank, its slice of each part of ``sizes`` (this
    rank's rows per part) one after the other: part ``p`` is ``{prefix}.{p}.weight``, drawn with
    ``inits[p]``. ``fused``: the name (``{fused}.weight``) of the one-process model's concatenation of the
    whole parts, in ``sizes``' order (:class:`Fused`)."""
    out = []
    total = sum(sizes.values()) * tp
    for suffix in ("weight", "bias"):
        p = getattr(linear, suffix, None)
        if p is None:
            continue
        first = start = 0
        for name, size in sizes.items():
            global_shape = (size * tp, *p.shape[1:])
            offsets = (rank * size,) + (0,) * (p.dim() - 1)
            part_of = None if fused is None else Fused(f"{fused}.{suffix}", (total, *p.shape[1:]), start)
            init = (inits or {}).get(name) if suffix == "weight" else None
            piece = Piece(f"{prefix}.{name}.{suffix}", p, global_shape, offsets, (first, first + size), None, init)
            out.append(replace(piece, fused=part_of))
            first, start = first + size, start + size * tp
    return out


def row_split(prefix: str, linear: nn.Module, rank: int, tp: int, init: Init | None = None) -> list[Piece]:
    """A row-parallel weight (this rank's columns) and its bias (whole on every rank)."""
    w = linear.weight
    out = [Piece(f"{prefix}.weight", w, (w.size(0), w.size(1) * tp), (0, rank * w.size(1)), init=init)]
    if linear.bias is not None:
        out.append(whole(f"{prefix}.bias", linear.bias))
    return out
