"""One layer of a hybrid model (``ModelConfig.layer_pattern``): ``x + block(norm(x))`` with one block.

The block is a Mamba-2 mixer (``M``), attention (``*``), an MLP (``-``) or a mixture of experts (``E``), as
in Nemotron-H; exactly one of ``mamba``, ``attn`` and ``mlp`` is set. Its checkpoint names are those of
the transformer layer's parts (``layers.{i}.norm1``, ``layers.{i}.attn.*``, ``layers.{i}.mlp.*``) plus
``layers.{i}.mamba.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from tp_layers import recompute

from ..errors import TrainerError
from .attention import Attention
from .block import RECOMPUTE, norm
from .config import ModelConfig
from .dropout import Dropout, DropoutRNG
from .groups import ModelGroups
from .kv_cache import KVCache
from .mamba import Mamba2Mixer
from .mlp import MLP, moe_layer
from .pieces import Piece, module_pieces
from .ssm_cache import PositionCache, SSMCache


class HybridLayer(nn.Module):
    """Global layer ``layer`` of a hybrid model; ``recompute`` and ``rng`` as for ``TransformerLayer``."""

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
        self.cfg, self.layer, self.full_recompute = cfg, layer, recompute == "full"
        self.kind = cfg.layer_kind(layer)
        self.norm1 = norm(cfg, groups)
        self.mamba = self.attn = self.mlp = None
        self.is_moe = self.kind == "moe"
        if self.kind == "mamba":
            self.mamba = Mamba2Mixer(cfg, groups, layer)
        elif self.kind == "attention":
            self.attn = Attention(cfg, groups, layer, seed, selective_recompute=recompute == "selective")
        else:
            self.mlp = moe_layer(cfg, groups, layer, seed) if self.is_moe else MLP(cfg, groups, layer, seed)
        self.rng = DropoutRNG(seed, groups, layer) if rng is None else rng
        self.dropout = Dropout(cfg.dropout, self.rng, sharded=groups.sequence_parallel)

    def pieces(self, prefix: str) -> list[Piece]:
        """The norm's pieces and its one block's (``mamba``, ``attn`` or ``mlp``), under ``prefix``."""
        out = module_pieces(f"{prefix}.norm1", self.norm1)
        for name in ("mamba", "attn", "mlp"):
            if getattr(self, name) is not None:
                out += getattr(self, name).pieces(f"{prefix}.{name}")
        return out

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | SSMCache | PositionCache | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``documents`` (packed batches) are refused: the Mamba scan would carry its state across them."""
        if documents is not None:
            raise TrainerError("packed documents are not supported by hybrid (Mamba) models yet")
        if cache is None and self.full_recompute and torch.is_grad_enabled():
            return recompute(self._forward, x, tracker=self.rng.tracker(x.device))
        return self._forward(x, cache)

    def _forward(self, x: torch.Tensor, cache: KVCache | SSMCache | PositionCache | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if self.mamba is not None:
            h = self.mamba(h, cache)
        elif self.attn is not None:
            h = self.attn(h, cache)
        else:
            h = self.mlp(h)
            if cache is not None:
                cache.advance(h.size(0))
        return x + self.dropout(h)

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache | SSMCache | PositionCache:
        """An empty inference cache of this layer's kind for ``batch`` sequences of up to ``max_len`` positions."""
        cfg = self.cfg
        if self.mamba is not None:
            channels = cfg.mamba_inner + 2 * cfg.mamba_groups * cfg.mamba_state
            shape = (batch, channels, cfg.mamba_conv, cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_state)
            return SSMCache(*shape, dtype=dtype, device=device)
        if self.attn is not None:
            return KVCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device)
        return PositionCache()
