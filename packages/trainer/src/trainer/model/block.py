"""One pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

from __future__ import annotations

import torch
from torch import nn

from pstate.tags import mark_sequence_parallel
from tp_layers import recompute

from ..errors import TrainerError
from .attention import Attention
from .config import ModelConfig
from .dropout import Dropout, DropoutRNG
from .groups import ModelGroups
from .kv_cache import KVCache
from .mla import LatentAttention
from .mlp import MLP, moe_layer
from .pieces import Piece, module_pieces

RECOMPUTE = (None, "full", "selective")


def norm(cfg: ModelConfig, groups: ModelGroups) -> nn.Module:
    """LayerNorm or RMSNorm over ``hidden``; tagged sequence-parallel (its gradient is partial over TP)."""
    if cfg.norm == "layernorm":
        module: nn.Module = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.bias)
    else:
        module = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    if groups.sequence_parallel:
        for p in module.parameters():
            mark_sequence_parallel(p)
    return module


class TransformerLayer(nn.Module):
    """Global layer ``layer`` of the model; ``recompute`` is ``None``, ``"full"`` or ``"selective"``;
    ``rng``: the dropout generator states of the chunk (its own, drawn for this layer, when not given)."""

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ModelGroups,
        layer: int,
        seed: int,
        *,
        recompute: str | None = None,
        rng: DropoutRNG | None = None,
    ) -> None:
        super().__init__()
        if recompute not in RECOMPUTE:
            raise TrainerError(f"recompute={recompute!r}: must be one of {RECOMPUTE}")
        self.layer, self.full_recompute = layer, recompute == "full"
        self.norm1, self.norm2 = norm(cfg, groups), norm(cfg, groups)
        attention = LatentAttention if cfg.attention == "mla" else Attention
        self.attn = attention(cfg, groups, layer, seed, selective_recompute=recompute == "selective")
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = moe_layer(cfg, groups, layer, seed) if self.is_moe else MLP(cfg, groups, layer, seed)
        self.rng = DropoutRNG(seed, groups, layer) if rng is None else rng  # the chunk's, shared by its layers
        self.dropout = Dropout(cfg.dropout, self.rng, sharded=groups.sequence_parallel)

    def pieces(self, prefix: str) -> list[Piece]:
        """The norms', the attention's and the MLP's pieces, under ``prefix`` (``layers.<global layer>``)."""
        norms = module_pieces(f"{prefix}.norm1", self.norm1) + module_pieces(f"{prefix}.norm2", self.norm2)
        return norms + self.attn.pieces(f"{prefix}.attn") + self.mlp.pieces(f"{prefix}.mlp")

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``documents``: packed batches' document ids and positions (see :class:`Attention`)."""
        if cache is None and self.full_recompute and torch.is_grad_enabled():
            return recompute(self._forward, x, None, documents, tracker=self.rng.tracker(x.device))
        return self._forward(x, cache, documents)

    def _forward(
        self, x: torch.Tensor, cache: KVCache | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), cache, documents))
        return x + self.dropout(self.mlp(self.norm2(x)))
