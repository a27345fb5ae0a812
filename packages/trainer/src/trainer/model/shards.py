"""The model's tensors as ``pstate.Shard`` pieces of the one-process model's tensors, by global name.

Names are layout-free (``layers.3.attn.q.weight``: layer numbers are global; fused tensors are split into
their logical parts; vocabulary padding is left out; the multi-token prediction modules are ``mtp.<k>.enorm``,
``mtp.<k>.hnorm``, ``mtp.<k>.proj`` and ``mtp.<k>.block.<as a layer>``), so a checkpoint written at one layout loads at
any other, and parity tests compare pieces against the one-process model's tensors directly.

:func:`model_pieces` says where each named piece sits, in a parameter and in the full tensor; the
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
import torch.distributed as dist
from torch import nn

from pstate import Shard, as_group

from .config import ModelConfig
from .gpt import GPTChunk, named_blocks


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (along dimension 0; all of them when ``None``) of ``param`` are the full tensor
    ``name``'s part at ``offsets`` of ``global_shape``; ``dim1`` selects a column block instead for the
    experts' fused ``[gate; up]`` dimension."""

    name: str
    param: nn.Parameter
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: tuple[int, int] | None = None
    dim1: tuple[int, int] | None = None

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor`` (the parameter or anything of its shape), as a view."""
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        if self.dim1 is not None:
            tensor = tensor[:, self.dim1[0] : self.dim1[1]]
        return tensor

    def shard(self, tensor: torch.Tensor) -> Shard:
        return Shard(self.of(tensor), self.global_shape, self.offsets)


def model_pieces(chunks: list[GPTChunk]) -> list[Piece]:
    """Every named piece of every parameter of ``chunks``."""
    out: list[Piece] = []
    for chunk in chunks:
        tp, rank, cfg = chunk.groups.tp_size, chunk.groups.tp_rank, chunk.cfg
        if chunk.embedding is not None:
            out.append(_vocab_rows("embedding.weight", chunk.embedding.weight, cfg.vocab_size, rank))
        if chunk.position is not None:
            out.append(_whole("position.weight", chunk.position))
        if chunk.final_norm is not None:
            out += _module("final_norm", chunk.final_norm)
        if chunk.head is not None:
            out.append(_vocab_rows("head.weight", chunk.head.weight, cfg.vocab_size, rank))
        for k, module in enumerate(chunk.mtp or ()):
            out += _mtp(f"mtp.{k}", module, rank, tp)
        for prefix, layer in named_blocks(chunk):  # the main layers, then the MTP modules' blocks
            out += _module(f"{prefix}.norm1", layer.norm1)
            if hasattr(layer, "norm2"):
                out += _module(f"{prefix}.norm2", layer.norm2)
            if getattr(layer, "mamba", None) is not None:
                out += _mamba(f"{prefix}.mamba", layer.mamba, rank, tp)
            if layer.attn is not None:
                out += _attention(f"{prefix}.attn", layer.attn, cfg, rank, tp)
            if layer.mlp is None:
                continue
            if layer.is_moe:
                out += _moe(f"{prefix}.mlp", layer.mlp, cfg.mlp == "swiglu")
                shared = layer.mlp.shared_expert
                if shared is not None:
                    f = cfg.moe_shared_ffn_hidden // tp
                    parts = {"gate": f, "up": f} if cfg.mlp == "swiglu" else {"fc1": f}
                    out += _fused(f"{prefix}.mlp.shared", shared.fc1, parts, rank, tp)
                    out += _row(f"{prefix}.mlp.shared.fc2", shared.fc2, rank, tp)
                    if shared.gate_weight is not None:
                        out.append(_whole(f"{prefix}.mlp.shared.gate_weight", shared.gate_weight))
            else:
                f = cfg.ffn // tp
                parts = {"gate": f, "up": f} if cfg.mlp == "swiglu" else {"fc1": f}
                out += _fused(f"{prefix}.mlp", layer.mlp.fc1, parts, rank, tp) + _row(
                    f"{prefix}.mlp.fc2", layer.mlp.fc2, rank, tp
                )
    return out


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


def _attention(prefix: str, attn: nn.Module, cfg: ModelConfig, rank: int, tp: int) -> list[Piece]:
    if cfg.attention == "mla":
        return _mla(prefix, attn, rank, tp) + _row(f"{prefix}.proj", attn.proj, rank, tp)
    d = cfg.head_dim
    parts = {"q": attn.heads * d, "k": attn.kv_heads * d, "v": attn.kv_heads * d}
    out = _fused(prefix, attn.qkv, parts, rank, tp) + _row(f"{prefix}.proj", attn.proj, rank, tp)
    if attn.q_norm is not None:
        out += _module(f"{prefix}.q_norm", attn.q_norm) + _module(f"{prefix}.k_norm", attn.k_norm)
    return out


def _mamba(prefix: str, mixer: nn.Module, rank: int, tp: int) -> list[Piece]:
    """The Mamba-2 mixer: ``in_proj`` as its parts ``z, x, B, C, dt``, the convolution as its ``x, B, C``
    channels, ``out_proj`` row-parallel, and this rank's heads of the per-head vectors and of the norm."""
    out = _fused(prefix, mixer.in_proj, mixer.sizes, rank, tp)
    out += _fused(f"{prefix}.conv", mixer.conv, {k: mixer.sizes[k] for k in ("x", "B", "C")}, rank, tp)
    for name in ("A_log", "D", "dt_bias"):
        p = getattr(mixer, name)
        out.append(Piece(f"{prefix}.{name}", p, (p.size(0) * tp,), (rank * p.size(0),)))
    w = mixer.norm.weight
    out.append(Piece(f"{prefix}.norm.weight", w, (w.size(0) * tp,), (rank * w.size(0),)))
    return out + _row(f"{prefix}.out_proj", mixer.out_proj, rank, tp)


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


def _whole(name: str, p: nn.Parameter) -> Piece:
    return Piece(name, p, tuple(p.shape), (0,) * p.dim())


def _module(prefix: str, module: nn.Module) -> list[Piece]:
    return [_whole(f"{prefix}.{name}", p) for name, p in module.named_parameters()]


def _vocab_rows(name: str, p: nn.Parameter, vocab: int, rank: int) -> Piece:
    """This rank's rows of the vocabulary, without the padding rows past ``vocab``."""
    rows = p.size(0)
    start = rank * rows
    valid = max(0, min(rows, vocab - start))
    return Piece(name, p, (vocab, p.size(1)), (min(start, vocab), 0), rows=(0, valid))


def _fused(prefix: str, linear: nn.Module, sizes: dict[str, int], rank: int, tp: int) -> list[Piece]:
    """A column-parallel weight holding, on this rank, its slice of each part one after the other."""
    out = []
    for suffix in ("weight", "bias"):
        p = getattr(linear, suffix, None)
        if p is None:
            continue
        first = 0
        for name, size in sizes.items():
            global_shape = (size * tp, *p.shape[1:])
            offsets = (rank * size,) + (0,) * (p.dim() - 1)
            out.append(Piece(f"{prefix}.{name}.{suffix}", p, global_shape, offsets, rows=(first, first + size)))
            first += size
    return out


def _row(prefix: str, linear: nn.Module, rank: int, tp: int) -> list[Piece]:
    w = linear.weight
    out = [Piece(f"{prefix}.weight", w, (w.size(0), w.size(1) * tp), (0, rank * w.size(1)))]
    if linear.bias is not None:
        out.append(_whole(f"{prefix}.bias", linear.bias))
    return out


def _mla(prefix: str, attn: nn.Module, rank: int, tp: int) -> list[Piece]:
    """Multi-latent attention: ``q`` or ``q_down``, ``q_down_norm``, ``q_up``; ``kv_down``, ``kv_down_norm``,
    ``kv_up`` (up-projections split by heads over TP, the rest replicated). ``proj`` is the caller's."""
    out = []
    for name in ("q", "q_up", "kv_up"):
        linear = getattr(attn, name)
        if linear is not None:
            out += _fused(prefix, linear, {name: linear.weight.size(0)}, rank, tp)
    for name in ("q_down", "q_down_norm", "kv_down", "kv_down_norm"):
        if getattr(attn, name) is not None:
            out += _module(f"{prefix}.{name}", getattr(attn, name))
    return out


def _mtp(prefix: str, module: nn.Module, rank: int, tp: int) -> list[Piece]:
    """An MTP module's norms and ``2H -> H`` projection (column-parallel); its block is named as a layer."""
    out = _module(f"{prefix}.enorm", module.enorm) + _module(f"{prefix}.hnorm", module.hnorm)
    return out + _fused(prefix, module.proj, {"proj": module.proj.weight.size(0)}, rank, tp)


def _moe(prefix: str, moe: nn.Module, swiglu: bool) -> list[Piece]:
    """Router (replicated) and experts: ``[experts, ...]`` tensors, this rank's experts and ETP slice."""
    experts = moe.experts
    etp, q = _etp(experts)
    num, first = moe.router.weight.size(0), experts.first_expert
    out = [_whole(f"{prefix}.router.{n}", p) for n, p in moe.router.named_parameters()]
    w1, w2 = experts.weight1, experts.weight2
    _, f_out, h = w1.shape
    names = ("gate", "up") if swiglu else ("fc1",)
    f = f_out // len(names)
    for i, name in enumerate(names):
        out.append(
            Piece(f"{prefix}.experts.{name}", w1, (num, f * etp, h), (first, q * f, 0), dim1=(i * f, (i + 1) * f))
        )
    _, h, f = w2.shape
    out.append(Piece(f"{prefix}.experts.fc2", w2, (num, h, f * etp), (first, 0, q * f)))
    return out


def _etp(experts: nn.Module) -> tuple[int, int]:
    group = experts.etp_group
    if group is None:
        return 1, 0
    pg = as_group(group)
    return dist.get_world_size(pg), dist.get_rank(pg)


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
