"""The model's tensors as ``pstate.Shard`` pieces of the one-process model's tensors, by global name.

Names are layout-free (``layers.3.attn.q.weight``: layer numbers are global; fused tensors are split into
their logical parts; vocabulary padding is left out), so a checkpoint written at one layout loads at
any other, and parity tests compare pieces against the one-process model's tensors directly. The
``Shard.data`` are views of the parameters (or of their gradients), so filling them in place loads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from pstate import Shard, as_group, tensor_parallel_shard

from .gpt import GPTChunk

Source = Callable[[nn.Parameter], torch.Tensor]


def _value(p: nn.Parameter) -> torch.Tensor:
    return p.data


def _grad(p: nn.Parameter) -> torch.Tensor:
    grad = getattr(p, "main_grad", None)
    grad = p.grad if grad is None else grad
    return torch.zeros_like(p) if grad is None else grad


def model_shards(chunks: list[GPTChunk], *, grads: bool = False) -> dict[str, Shard]:
    """Every tensor of ``chunks`` (or its gradient, with ``grads=True``) as pieces of the full model's."""
    source: Source = _grad if grads else _value
    out: dict[str, Shard] = {}
    for chunk in chunks:
        tp, rank = chunk.groups.tp_size, chunk.groups.tp_rank
        if chunk.embedding is not None:
            out["embedding.weight"] = _vocab_rows(source(chunk.embedding.weight), chunk, rank)
        if chunk.position is not None:
            out["position.weight"] = _replicated(source(chunk.position))
        if chunk.final_norm is not None:
            out.update(_replicated_module("final_norm", chunk.final_norm, source))
        if chunk.head is not None:
            out["head.weight"] = _vocab_rows(source(chunk.head.weight), chunk, rank)
        for layer in chunk.layers:
            prefix = f"layers.{layer.layer}"
            out.update(_replicated_module(f"{prefix}.norm1", layer.norm1, source))
            out.update(_replicated_module(f"{prefix}.norm2", layer.norm2, source))
            attn, d, cfg = layer.attn, chunk.cfg.head_dim, chunk.cfg
            sizes = {"q": attn.heads * d, "k": attn.kv_heads * d, "v": attn.kv_heads * d}
            out.update(_fused(f"{prefix}.attn", attn.qkv, sizes, source, rank, tp))
            out.update(_row(f"{prefix}.attn.proj", attn.proj, source, rank, tp))
            if layer.is_moe:
                out.update(_moe(f"{prefix}.mlp", layer.mlp, cfg.mlp == "swiglu", source))
            else:
                f = cfg.ffn // tp
                sizes = {"gate": f, "up": f} if cfg.mlp == "swiglu" else {"fc1": f}
                out.update(_fused(f"{prefix}.mlp", layer.mlp.fc1, sizes, source, rank, tp))
                out.update(_row(f"{prefix}.mlp.fc2", layer.mlp.fc2, source, rank, tp))
    return out


def _replicated(t: torch.Tensor) -> Shard:
    return Shard(t, tuple(t.shape), (0,) * t.dim())


def _replicated_module(prefix: str, module: nn.Module, source: Source) -> dict[str, Shard]:
    return {f"{prefix}.{name}": _replicated(source(p)) for name, p in module.named_parameters()}


def _vocab_rows(t: torch.Tensor, chunk: GPTChunk, rank: int) -> Shard:
    """This rank's rows of the vocabulary, without the padding rows past ``vocab_size``."""
    vocab, rows = chunk.cfg.vocab_size, t.size(0)
    start = rank * rows
    valid = max(0, min(rows, vocab - start))
    return Shard(t[:valid], (vocab, t.size(1)), (min(start, vocab), 0))


def _fused(
    prefix: str, linear: nn.Module, sizes: dict[str, int], source: Source, rank: int, tp: int
) -> dict[str, Shard]:
    """A column-parallel weight holding, on this rank, its slice of each part one after the other."""
    out = {}
    for suffix in ("weight", "bias"):
        param = getattr(linear, suffix, None)
        if param is None:
            continue
        for name, t in zip(sizes, source(param).split(list(sizes.values()))):
            out[f"{prefix}.{name}.{suffix}"] = tensor_parallel_shard(t, 0, rank, tp)
    return out


def _row(prefix: str, linear: nn.Module, source: Source, rank: int, tp: int) -> dict[str, Shard]:
    out = {f"{prefix}.weight": tensor_parallel_shard(source(linear.weight), 1, rank, tp)}
    if linear.bias is not None:
        out[f"{prefix}.bias"] = _replicated(source(linear.bias))
    return out


def _moe(prefix: str, moe: nn.Module, swiglu: bool, source: Source) -> dict[str, Shard]:
    """Router (replicated) and experts: ``[experts, ...]`` tensors, this rank's experts and ETP slice."""
    experts = moe.experts
    etp, q = _etp(experts)
    num = moe.router.weight.size(0)
    first = experts.first_expert
    out = {f"{prefix}.router.{n}": _replicated(source(p)) for n, p in moe.router.named_parameters()}
    w1, w2 = source(experts.weight1), source(experts.weight2)
    parts = dict(zip(("gate", "up"), w1.chunk(2, 1))) if swiglu else {"fc1": w1}
    for name, t in parts.items():
        _, f, h = t.shape
        out[f"{prefix}.experts.{name}"] = Shard(t, (num, f * etp, h), (first, q * f, 0))
    _, h, f = w2.shape
    out[f"{prefix}.experts.fc2"] = Shard(w2, (num, h, f * etp), (first, 0, q * f))
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
