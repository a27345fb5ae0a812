"""Self-attention split over TP (heads), CP (sequence: ring, Ulysses or both) and SP (the projections' I/O)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cp_ring
from tp_layers import ColumnParallelLinear, RowParallelLinear, copy_to_region, recompute

from ..errors import TrainerError
from . import init
from .config import ModelConfig
from .groups import ModelGroups
from .kv_cache import KVCache
from .pieces import Init, Piece, fused_rows, module_pieces, row_split
from .rotary import apply_rotary, inverse_frequencies, rotary_angles, rotary_scale


class Attention(nn.Module):
    """Causal multi-head or grouped-query attention on ``[seq, batch, hidden]``.

    The fused ``qkv`` weight holds, on each TP rank, that rank's query heads, then its key heads, then
    its value heads (so ``tp`` must divide ``kv_heads``). ``selective_recompute`` recomputes the core
    attention (the softmax part) in backward instead of keeping it. With ``cfg.qk_norm`` every query and
    key head is RMS-normalised (weights ``q_norm``, ``k_norm`` of ``head_dim``, replicated over TP: their
    gradients are summed over TP in backward, as each rank's heads give a part of it).
    """

    def __init__(
        self, cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int, *, selective_recompute: bool = False
    ) -> None:
        super().__init__()
        tp = groups.tp_size
        if cfg.num_kv_heads % tp:
            raise TrainerError(f"tp={tp} must divide the key/value heads ({cfg.num_kv_heads}) of the model")
        self.cfg, self.groups, self.layer, self.selective_recompute = cfg, groups, layer, selective_recompute
        self.heads, self.kv_heads, d = cfg.heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        sp, rows = groups.sequence_parallel, (cfg.heads + 2 * cfg.num_kv_heads) * d
        full = init.placeholder((rows, cfg.hidden))  # values drawn per piece (trainer.model.seeded)
        qkv_bias, proj_bias = cfg.has_bias("qkv"), cfg.has_bias("proj")
        zeros = torch.zeros(full.size(0)) if qkv_bias else None
        self.qkv = ColumnParallelLinear(
            cfg.hidden, full.size(0), group=groups.tp, bias=qkv_bias, sequence_parallel=sp,
            keep_gathered_input=groups.keep_gathered_input, full_weight=full, full_bias=zeros,
        )  # fmt: skip
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(d, eps=cfg.norm_eps), nn.RMSNorm(d, eps=cfg.norm_eps)

        proj = init.placeholder((cfg.hidden, cfg.heads * d))
        self.proj = RowParallelLinear(
            cfg.heads * d, cfg.hidden, group=groups.tp, bias=proj_bias, input_is_parallel=True,
            sequence_parallel=sp, full_weight=proj, full_bias=torch.zeros(cfg.hidden) if proj_bias else None,
        )  # fmt: skip

    def pieces(self, prefix: str) -> list[Piece]:
        """``q``, ``k``, ``v`` (this rank's heads of each; GPT-2 stores them fused as ``qkv``), ``proj``
        (this rank's columns) and the replicated QK-norm weights."""
        cfg, tp, rank, d = self.cfg, self.groups.tp_size, self.groups.tp_rank, self.cfg.head_dim
        inits = {p: Init(self.layer, p, cfg.init_std) for p in "qkv"}
        sizes = {"q": self.heads * d, "k": self.kv_heads * d, "v": self.kv_heads * d}
        out = fused_rows(prefix, self.qkv, sizes, rank, tp, inits, fused=f"{prefix}.qkv")
        out += row_split(f"{prefix}.proj", self.proj, rank, tp, Init(self.layer, "proj", init.output_std(cfg)))
        if self.q_norm is not None:
            out += module_pieces(f"{prefix}.q_norm", self.q_norm) + module_pieces(f"{prefix}.k_norm", self.k_norm)
        return out

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``cache`` (inference, TP=CP=1): ``x`` holds the tokens after the cached ones (see ``kv_cache``).
        ``documents`` (packed training batches, see ``trainer.model.documents``): ``[2, batch, seq]`` document
        ids and positions within the document of this CP rank's tokens; attention stays inside each document
        and rotary positions restart at each. The KV cache path refuses them."""
        if documents is not None and cache is not None:
            raise TrainerError("packed documents are for training: the KV cache path takes none")
        qkv = self.qkv(x)  # [seq (whole CP-local sequence), batch, (heads + 2*kv_heads) * head_dim / tp]
        seq, batch, d = qkv.size(0), qkv.size(1), self.cfg.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = (t.reshape(seq, batch, -1, d).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        if self.cfg.position == "rotary":
            positions = self.positions(seq, qkv.device) if cache is None else cache.positions(seq, qkv.device)
            cos, sin = rotary_for(self.cfg, positions, documents)
            turn = self.cfg.rope_interleave
            q, k = apply_rotary(q, cos, sin, interleaved=turn), apply_rotary(k, cos, sin, interleaved=turn)
        if cache is not None:
            out = cache.attend(q, k, v)
        elif self.selective_recompute and torch.is_grad_enabled():
            out = recompute(self.core, q, k, v, None if documents is None else documents[0])
        else:
            out = self.core(q, k, v, None if documents is None else documents[0])
        return self.proj(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))

    def _norm(self, norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), copy_to_region(norm.weight, group=self.groups.tp), norm.eps)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """The global positions of this CP rank's ``local_len`` tokens (zigzag placement)."""
        return sequence_positions(local_len, self.groups, device)

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention over the whole sequence; ``[batch, heads, seq, head_dim]`` in and out.
        ``doc_ids`` (``[batch, seq]``, packed documents): a query sees only keys of its own document."""
        return causal_attention(q, k, v, self.groups, documents=doc_ids)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: ModelGroups,
    scale: float | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the CP-split sequence (SDPA layout), ``scale`` defaulting to ``head_dim**-0.5``;
    ``documents`` (``[batch, seq]`` ids, packed batches) keeps each query inside its own document."""
    if groups.cp_size == 1:
        gqa = k.size(1) != q.size(1)
        if documents is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        mask = cp_ring.document_mask(documents)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if groups.cp_attention == "ulysses":
        return cp_ring.ulysses_attention(q, k, v, group=groups.cp, scale=scale, documents=documents)
    kernel = cp_ring.make_kernel(groups.cp_kernel, q.device)
    if groups.cp_attention == "hierarchical":
        return cp_ring.hierarchical_attention(
            q, k, v, a2a_group=groups.cp_a2a, ring_group=groups.cp_ring, scale=scale, kernel=kernel, documents=documents
        )
    return cp_ring.ring_attention(q, k, v, group=groups.cp, scale=scale, kernel=kernel, documents=documents)


def rotary_for(
    cfg: ModelConfig, positions: torch.Tensor, documents: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary ``(cos, sin)`` of this rank's tokens: at ``positions`` (``[seq, dim]``), or per sequence at
    packed ``documents``' positions within each document (``[batch, 1, seq, dim]``); both times
    :func:`~trainer.model.rotary.rotary_scale` (YaRN's attention factor)."""
    freqs, scale = inverse_frequencies(cfg, positions.device), rotary_scale(cfg)
    if documents is not None:
        cos, sin = rotary_angles(documents[1], freqs)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    else:
        cos, sin = rotary_angles(positions, freqs)
    return (cos, sin) if scale == 1.0 else (cos * scale, sin * scale)


def sequence_positions(local_len: int, groups: ModelGroups, device: torch.device) -> torch.Tensor:
    """Global positions of the ``local_len`` tokens this CP rank holds (zigzag, as the data is sharded)."""
    cp = groups.cp_size
    full = torch.arange(local_len * cp, device=device)
    return full if cp == 1 else cp_ring.shard_sequence(full, group=groups.cp, dim=0)
