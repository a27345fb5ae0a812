"""Multi-latent attention (DeepSeek-V2/V3) split over TP (heads), CP (ring or Ulysses) and SP.

Per token, ``kv_down`` projects the hidden state to a latent of ``kv_lora_rank`` (RMS-normalised) and one
rotary key of ``qk_rope_head_dim`` shared by every head; ``kv_up`` expands the latent into each head's
key (``qk_nope_head_dim``) and value (``v_head_dim``). Queries come from ``q`` directly, or through a
normalised latent of ``q_lora_rank`` (``q_down``, ``q_up``). A head's query/key is its non-rotary part
followed by its rotary part; the softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`` (with
YaRN times ``mscale(rope_mscale_all_dim) ** 2``, as DeepSeek-V3).

Parallel split: the down-projections and latent norms are replicated over TP and run on the whole
(SP-gathered) sequence; the up-projections are column-parallel over heads and the output projection
row-parallel. Each rank's heads give part of the latents' (and the shared rotary key's) gradient, which
is all-reduced over TP where the latents enter the up-projections, so the replicated weights get their
whole gradient on every rank (no extra synchronisation) and the SP gather only keeps this rank's slice
of the input gradient. Ring and Ulysses attention take keys and values of one width: with
``v_head_dim`` other than the query/key width, the narrower of the two is zero-padded (zeros add nothing
to the scores or the output) and the output cut back to ``v_head_dim``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_layers import ColumnParallelLinear, RowParallelLinear, copy_to_region, gather_from_sequence_region, recompute

from ..errors import TrainerError
from . import init
from .attention import causal_attention, rotary_for, sequence_positions
from .config import ModelConfig
from .groups import ModelGroups
from .mla_cache import LatentCache
from .pieces import Init, Piece, fused_rows, module_pieces, row_split, whole
from .rotary import apply_rotary, yarn_mscale

LATENT_NORM_EPS = 1e-6
"""The epsilon of the latents' RMSNorms (DeepSeek's, whatever ``norm_eps`` is)."""


def _replicated(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear layer every TP rank holds whole; zero until its values are drawn or loaded."""
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(torch.zeros(out_features, in_features))
    return linear


def mla_matrices(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """The weight matrices of one MLA layer as ``(in, out, norm weights after it)`` (for counts)."""
    h, heads, rope, rank = cfg.hidden, cfg.heads, cfg.qk_rope_head_dim, cfg.q_lora_rank
    qk = heads * cfg.head_dim
    q = [(h, qk, 0)] if rank is None else [(h, rank, rank), (rank, qk, 0)]
    kv_up = heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return [
        *q,
        (h, cfg.kv_lora_rank + rope, cfg.kv_lora_rank),
        (cfg.kv_lora_rank, kv_up, 0),
        (heads * cfg.v_head_dim, h, 0),
    ]


class LatentAttention(nn.Module):
    """Causal multi-latent attention on ``[seq, batch, hidden]`` (``seq/tp`` with sequence parallelism)."""

    def __init__(
        self, cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int, *, selective_recompute: bool = False
    ) -> None:
        super().__init__()
        tp = groups.tp_size
        if cfg.heads % tp:
            raise TrainerError(f"tp={tp} must divide the attention heads ({cfg.heads}) of the model")
        self.cfg, self.groups, self.layer, self.selective_recompute = cfg, groups, layer, selective_recompute
        self.heads = cfg.heads // tp
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        def column(in_features: int, out_features: int) -> ColumnParallelLinear:
            full = init.placeholder((out_features, in_features))  # values drawn per piece (trainer.model.seeded)
            return ColumnParallelLinear(in_features, out_features, group=groups.tp, bias=False, full_weight=full)

        self.q = self.q_down = self.q_down_norm = self.q_up = None
        if cfg.q_lora_rank is None:
            self.q = column(cfg.hidden, cfg.heads * (dn + dr))
        else:
            self.q_down = _replicated(cfg.hidden, cfg.q_lora_rank)
            self.q_down_norm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = column(cfg.q_lora_rank, cfg.heads * (dn + dr))
        self.kv_down = _replicated(cfg.hidden, cfg.kv_lora_rank + dr)
        self.kv_down_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_up = column(cfg.kv_lora_rank, cfg.heads * (dn + dv))
        self.proj = RowParallelLinear(
            cfg.heads * dv, cfg.hidden, group=groups.tp, bias=False, input_is_parallel=True,
            sequence_parallel=groups.sequence_parallel, full_weight=init.placeholder((cfg.hidden, cfg.heads * dv)),
        )  # fmt: skip

    def pieces(self, prefix: str) -> list[Piece]:
        """``q`` or ``q_down``, ``q_down_norm``, ``q_up``; ``kv_down``, ``kv_down_norm``, ``kv_up``; ``proj``: the
        up-projections split by heads over TP (rows), ``proj`` by its columns, the rest replicated."""
        cfg, tp, rank = self.cfg, self.groups.tp_size, self.groups.tp_rank
        out = []
        for name in ("q", "q_up", "kv_up"):
            linear = getattr(self, name)
            if linear is not None:
                inits = {name: Init(self.layer, name, cfg.init_std)}
                out += fused_rows(prefix, linear, {name: linear.weight.size(0)}, rank, tp, inits)
        for name in ("q_down", "kv_down"):
            if (linear := getattr(self, name)) is not None:
                out.append(whole(f"{prefix}.{name}.weight", linear.weight, Init(self.layer, name, cfg.init_std)))
        for name in ("q_down_norm", "kv_down_norm"):
            if getattr(self, name) is not None:
                out += module_pieces(f"{prefix}.{name}", getattr(self, name))
        return out + row_split(f"{prefix}.proj", self.proj, rank, tp, Init(self.layer, "proj", init.output_std(cfg)))

    def forward(
        self, x: torch.Tensor, cache: LatentCache | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``cache`` (inference: a ``LatentCache`` or the engine's paged layer): ``x`` holds the tokens after
        the cached ones (see ``mla_cache``). ``documents``: packed batches, as for ``Attention``."""
        if documents is not None and cache is not None:
            raise TrainerError("packed documents are for training: the KV cache path takes none")
        cfg, tp = self.cfg, self.groups.tp
        dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if self.groups.sequence_parallel:  # its consumers below give whole gradients, not TP partial sums
            x = gather_from_sequence_region(x, group=tp, reduce_grad=False)
        seq, batch = x.size(0), x.size(1)
        q = self.q(x) if self.q is not None else self.q_up(self.q_down_norm(self.q_down(x)))
        q = q.reshape(seq, batch, self.heads, dn + dr).permute(1, 2, 0, 3)  # [batch, heads, seq, dn + dr]
        latent, k_rot = self.kv_down(x).split([cfg.kv_lora_rank, dr], dim=-1)
        latent = self.kv_down_norm(latent)  # [seq, batch, kv_lora_rank]
        k_rot = copy_to_region(k_rot, group=tp).permute(1, 0, 2).unsqueeze(1)  # [batch, 1, seq, dr], all heads'
        positions = sequence_positions(seq, self.groups, x.device) if cache is None else cache.positions(seq, x.device)
        cos, sin = rotary_for(cfg, positions, documents)
        q_nope, q_rot = q.split([dn, dr], dim=-1)
        q_rot = apply_rotary(q_rot, cos, sin, interleaved=cfg.rope_interleave)
        k_rot = apply_rotary(k_rot, cos, sin, interleaved=cfg.rope_interleave)
        if cache is not None:
            out = cache.attend_latent(q_nope, q_rot, latent.transpose(0, 1), k_rot[:, 0], self.kv_up.weight, self.scale)
        else:
            kv = self.kv_up(latent).reshape(seq, batch, self.heads, -1).permute(1, 2, 0, 3)
            k_nope, v = kv.split([dn, cfg.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)
            q = torch.cat([q_nope, q_rot], dim=-1)
            doc_ids = None if documents is None else documents[0]
            if self.selective_recompute and torch.is_grad_enabled():
                out = recompute(self.core, q, k, v, doc_ids)
            else:
                out = self.core(q, k, v, doc_ids)
        return self.proj(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))

    @property
    def scale(self) -> float:
        """``head_dim ** -0.5``, times DeepSeek's YaRN correction ``mscale(rope_mscale_all_dim) ** 2``."""
        cfg = self.cfg
        mscale = yarn_mscale(cfg, cfg.rope_mscale_all_dim) if cfg.rope_type == "yarn" and cfg.rope_mscale_all_dim else 1
        return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * mscale * mscale

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention, ``q``/``k`` ``[batch, heads, seq, dn + dr]``, ``v`` and the output ``[..., dv]``;
        ``doc_ids``: packed documents, as for ``Attention.core``."""
        dv = v.size(-1)
        if self.groups.cp_size == 1 or dv == q.size(-1):
            return causal_attention(q, k, v, self.groups, self.scale, doc_ids)
        width = max(dv, q.size(-1))
        q, k, v = (F.pad(t, (0, width - t.size(-1))) for t in (q, k, v))
        return causal_attention(q, k, v, self.groups, self.scale, doc_ids)[..., :dv]
