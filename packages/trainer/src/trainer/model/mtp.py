"""DeepSeek-V3's multi-token prediction (MTP): ``model.mtp_depth`` modules on the last pipeline stage.

Module ``k`` (1-based) takes the previous depth's hidden state ``h`` (depth 0: the main model's last
hidden state, before the final norm) and the embedding of token ``t+k``, and computes
``block(proj([enorm(Emb(t+k)); hnorm(h)]))``: a ``2H -> H`` projection (the embedding's half first, as
DeepSeek-V3's released ``eh_proj`` weights take it) and one transformer layer (global layer number
``layers + k - 1``: its seeds and its kind, dense or MoE, follow that number). The main model's final
norm and output head, shared, turn the result into the prediction of token ``t+k+1``; the embedding
table is the main model's too (at pp > 1 the last stage's tied copy).

The labels ``[batch, seq]`` are the tokens shifted by one, so token ``t+k`` is label ``t+k-1`` and the
target of depth ``k`` at position ``t`` is label ``t+k``: the last ``k`` positions have none and are left
out of that depth's mean. The MTP loss is the mean over the depths of those cross entropies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tp_layers import ColumnParallelLinear, scatter_to_sequence_region, vocab_parallel_cross_entropy

from ..errors import TrainerError
from . import init
from .block import TransformerLayer, norm
from .config import ModelConfig
from .dropout import DropoutRNG
from .groups import ModelGroups
from .pieces import Init, Piece, fused_rows, module_pieces

if TYPE_CHECKING:
    from .gpt import GPTChunk

IGNORE = -100
"""The target with no loss (the cross entropy's ignore index)."""


class MTPModule(nn.Module):
    """MTP depth ``depth + 1``: ``enorm``, ``hnorm``, ``proj`` (column-parallel over TP, its output
    gathered, then split along the sequence again under SP) and ``block``."""

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ModelGroups,
        depth: int,
        seed: int,
        *,
        recompute: str | None = None,
        rng: DropoutRNG | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.groups, self.layer = cfg, groups, cfg.layers + depth
        self.enorm, self.hnorm = norm(cfg, groups), norm(cfg, groups)
        self.proj = ColumnParallelLinear(
            2 * cfg.hidden, cfg.hidden, group=groups.tp, bias=False, gather_output=True,
            sequence_parallel=groups.sequence_parallel, keep_gathered_input=groups.keep_gathered_input,
            full_weight=init.placeholder((cfg.hidden, 2 * cfg.hidden)),
        )  # fmt: skip
        self.block = TransformerLayer(cfg, groups, cfg.layers + depth, seed, recompute=recompute, rng=rng)

    def pieces(self, prefix: str) -> list[Piece]:
        """The norms, the ``2H -> H`` projection ``proj`` (this rank's rows) and the block as a layer
        (``{prefix}.block.*``); its tensors are drawn as those of global layer ``layers + depth``."""
        tp, rank = self.groups.tp_size, self.groups.tp_rank
        out = module_pieces(f"{prefix}.enorm", self.enorm) + module_pieces(f"{prefix}.hnorm", self.hnorm)
        inits = {"proj": Init(self.layer, "eh_proj", self.cfg.init_std)}
        out += fused_rows(prefix, self.proj, {"proj": self.proj.weight.size(0)}, rank, tp, inits)
        return out + self.block.pieces(f"{prefix}.block")

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """``hidden`` and ``embedded``: ``[seq(/tp), batch, hidden]``; returns the depth's hidden state."""
        x = self.proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))  # [seq, batch, hidden]
        if self.groups.sequence_parallel:
            x = scatter_to_sequence_region(x, group=self.groups.tp)
        return self.block(x)


def shifted(labels: torch.Tensor, by: int, fill: int) -> torch.Tensor:
    """``labels`` ``[batch, seq]`` moved ``by`` positions to the left, the last ``by`` filled with ``fill``."""
    out = torch.full_like(labels, fill)
    out[:, : labels.size(1) - by] = labels[:, by:]
    return out


def mtp_loss(chunk: GPTChunk, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the MTP depths of each depth's mean cross entropy over the positions that have a
    target: ``hidden`` is the last stage's hidden state before the final norm, ``labels`` ``[batch, seq]``
    the micro-batch's (every TP rank computes the same value, as for the main loss)."""
    if chunk.mtp is None or chunk.embedding is None:
        raise TrainerError("mtp_loss: this chunk holds no MTP modules (the last stage with model.mtp_depth > 0)")
    batch, seq = labels.shape
    if seq <= len(chunk.mtp):
        raise TrainerError(f"model.mtp_depth={len(chunk.mtp)}: must be below the sequence length {seq}")
    groups, h, losses = chunk.groups, hidden, []
    for k, module in enumerate(chunk.mtp, start=1):
        tokens = shifted(labels, k - 1, 0).clamp(min=0)  # token t+k
        h = module(h, chunk.embedding(tokens.t()))
        logits = chunk.logits(chunk.final_norm(h))
        target = shifted(labels, k, IGNORE).t()  # token t+k+1
        per_token = vocab_parallel_cross_entropy(logits, target, group=groups.tp, vocab_size=chunk.cfg.vocab_size)
        losses.append(per_token.sum() / (batch * (seq - k)))
    return torch.stack(losses).mean()
