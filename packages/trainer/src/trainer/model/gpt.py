"""``GPTChunk``: the part of the GPT model one pipeline stage holds, and the language-model loss.

A chunk holds global transformer layers ``stage.layers``; the first stage also embeds token ids and the
last also applies the final norm and the output head. ``build_chunks`` gives a rank its ``vpp`` chunks.
With tied embeddings and several stages, the last stage keeps its own copy of the embedding table
(drawn from the same seed, tagged ``pstate.tags.mark_tied_copy``); :func:`tied_embedding_params` lists
the copies whose gradients must be summed over the ``embedding`` group so that they stay equal.
With ``model.mtp_depth > 0`` the last stage also holds the multi-token prediction modules
(:mod:`trainer.model.mtp`), which use that table. For inference at TP=CP=1, ``forward(ids, caches)`` takes
one :class:`KVCache` per layer (``kv_caches``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_dispatch import StagedRun
from pp_sched import StageLayers, split_layers
from pstate.tags import mark_sequence_parallel, mark_tied_copy
from tp_layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)

from ..errors import TrainerError
from . import init
from .attention import sequence_positions
from .block import TransformerLayer, norm
from .config import ModelConfig
from .dropout import Dropout, DropoutRNG
from .groups import ModelGroups
from .hybrid import HybridLayer
from .kv_cache import KVCache, check_caches
from .mla_cache import LatentCache
from .mtp import MTPModule
from .pieces import Init, Piece, module_pieces, vocab_rows, whole
from .ssm_cache import PositionCache, SSMCache
from .staged import staged_run


class GPTChunk(nn.Module):
    """Stage ``stage`` of the model. Input: token ids ``[batch, seq]`` on the first stage, else hidden
    states ``[seq, batch, hidden]`` (``seq/tp`` with sequence parallelism). Output: hidden states, or on
    the last stage the logits ``[seq, batch, padded_vocab/tp]`` of this TP rank's vocabulary slice; with
    MTP modules (``model.mtp_depth > 0``, no KV caches) ``(logits, hidden)``, the hidden state before the
    final norm that :func:`trainer.model.mtp.mtp_loss` continues from."""

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ModelGroups,
        stage: StageLayers,
        *,
        seed: int,
        recompute: str | None = None,
    ) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise TrainerError("model.vocab_size is not set (it comes from the tokenizer when training)")
        self.cfg, self.groups, self.stage = cfg, groups, stage
        self.rng = DropoutRNG(seed, groups, stage.stage)
        kind = TransformerLayer if cfg.layer_pattern is None else HybridLayer
        self.layers = nn.ModuleList(
            kind(cfg, groups, layer, seed, recompute=recompute, rng=self.rng) for layer in stage.layers
        )
        self.dropout = Dropout(cfg.dropout, self.rng, sharded=groups.sequence_parallel)
        self.embedding = self.position = self.final_norm = self.head = None
        if stage.embedding or (stage.head and cfg.tied_embeddings):
            self.embedding = embedding_table(cfg, groups, seed)
            if not stage.embedding:  # the last stage's copy: clipping counts the tensor once, at the first
                mark_tied_copy(self.embedding.weight)
        if stage.embedding and cfg.position == "learned":
            self.position = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.hidden))  # drawn by build_chunks
            if groups.sequence_parallel:
                mark_sequence_parallel(self.position)
        if stage.head:
            self.final_norm = norm(cfg, groups)
            if not cfg.tied_embeddings:
                self.head = output_head(cfg, groups, seed)
        self.mtp = None
        if stage.head and cfg.mtp_depth:
            if self.embedding is None:
                raise TrainerError(
                    f"model.mtp_depth={cfg.mtp_depth}: the MTP modules on the last pipeline stage need the "
                    "embedding table; with pp > 1 only tied embeddings (model.tied_embeddings=true) give it a copy"
                )
            self.mtp = nn.ModuleList(
                MTPModule(cfg, groups, k, seed, recompute=recompute, rng=self.rng) for k in range(cfg.mtp_depth)
            )

    def pieces(self) -> list[Piece]:
        """Every named piece this chunk holds: the embedding table and the output head (this rank's rows of
        the vocabulary, without padding), the learned positions, the final norm, the layers
        (``layers.<global layer>``) and the MTP modules (``mtp.<depth - 1>``)."""
        cfg, rank, out = self.cfg, self.groups.tp_rank, []
        embedding = init.EMBEDDING_LAYER
        if self.embedding is not None:
            table = Init(embedding, "embedding", cfg.init_std)  # a tied copy draws the same values
            out.append(vocab_rows("embedding.weight", self.embedding.weight, cfg.vocab_size, rank, table))
        if self.position is not None:
            out.append(whole("position.weight", self.position, Init(embedding, "position", cfg.init_std)))
        if self.final_norm is not None:
            out += module_pieces("final_norm", self.final_norm)
        if self.head is not None:
            head = Init(embedding, "head", cfg.init_std)
            out.append(vocab_rows("head.weight", self.head.weight, cfg.vocab_size, rank, head))
        for layer in self.layers:
            out += layer.pieces(f"layers.{layer.layer}")
        for k, module in enumerate(self.mtp or ()):
            out += module.pieces(f"mtp.{k}")
        return out

    def forward(
        self,
        x: torch.Tensor,
        caches: Sequence[KVCache] | Sequence[LatentCache] | torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``caches`` (one per layer, TP=CP=1): ``x`` holds the tokens after the cached ones, which the caches
        then also hold. ``documents`` (packed batches, ``trainer.model.documents``): this CP rank's document
        ids and positions; a stage other than the last then returns ``(hidden, documents)`` for the next. The
        pipeline executor passes a stage's inputs positionally, so a tensor in ``caches``' place is taken as
        ``documents``. Packed documents and KV caches do not mix (refused)."""
        if isinstance(caches, torch.Tensor):
            caches, documents = None, caches
        if documents is not None and caches is not None:
            raise TrainerError("packed documents are for training: the KV cache path takes none")
        kind = LatentCache if self.cfg.attention == "mla" else KVCache
        if self.cfg.layer_pattern is not None:
            kind = (KVCache, SSMCache, PositionCache)
        start = None if caches is None else check_caches(caches, self.groups, len(self.layers), kind)
        if self.stage.embedding:
            x = self.embed(x, start, documents)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i], documents)
        if self.stage.head:
            logits = self.logits(self.final_norm(x))
            return (logits, x) if self.mtp is not None and caches is None else logits
        return x if documents is None else (x, documents)

    def staged_run(self) -> StagedRun:
        """One training microbatch through this chunk cut at its MoE all-to-alls, for a pipeline executor
        that overlaps them with another microbatch (``train.moe_overlap``; see :mod:`.staged`)."""
        return staged_run(self)

    def kv_caches(self, batch: int, max_len: int | None = None) -> list[KVCache] | list[LatentCache]:
        """Empty caches for this chunk's layers: ``batch`` sequences of up to ``max_len`` (``max_seq_len``)
        positions, in the dtype and on the device of the weights (latent caches for MLA; a hybrid model's Mamba
        and MLP layers get the caches of :mod:`.ssm_cache`)."""
        weight, cfg = next(self.parameters()), self.cfg
        if cfg.layer_pattern is not None:
            size = max_len or cfg.max_seq_len
            return [layer.new_cache(batch, size, weight.dtype, weight.device) for layer in self.layers]
        if cfg.attention == "mla":
            shape = (batch, max_len or cfg.max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
            return [LatentCache(*shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        shape = (batch, self.cfg.num_kv_heads, max_len or self.cfg.max_seq_len, self.cfg.head_dim)
        return [KVCache(*shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]

    def embed(self, ids: torch.Tensor, start: int | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[batch, seq]`` (this CP rank's part) to hidden states ``[seq(/tp), batch, hidden]``;
        ``start``: the ids are positions ``start, start+1, ...`` (with a KV cache); ``documents``: packed
        documents, whose positions restart at each document."""
        if ids.dim() != 2:
            raise TrainerError(f"token ids must be [batch, seq], got shape {tuple(ids.shape)}")
        seq = ids.size(1)
        h = self.embedding(ids.t())
        if self.position is not None:
            end = (start or 0) + seq * self.groups.cp_size
            if end > self.cfg.max_seq_len:
                raise TrainerError(f"sequence of {end} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            if documents is not None:  # [seq, batch] positions of each sequence
                positions = documents[1].t()
            elif start is None:
                positions = sequence_positions(seq, self.groups, ids.device)
            else:
                positions = torch.arange(start, end, device=ids.device)
            if self.groups.sequence_parallel:
                positions = positions.chunk(self.groups.tp_size)[self.groups.tp_rank]
            table = self.position[positions]
            h = h + (table if documents is not None else table.unsqueeze(1))
        return self.dropout(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(h)
        g = self.groups
        return column_parallel_linear(
            h, self.embedding.weight, group=g.tp, sequence_parallel=g.sequence_parallel,
            keep_gathered_input=g.keep_gathered_input,
        )  # fmt: skip


def named_blocks(chunk: GPTChunk) -> list[tuple[str, TransformerLayer]]:
    """The chunk's transformer layers by layout-free prefix: ``layers.<global layer>`` and the MTP
    modules' ``mtp.<depth - 1>.block``."""
    out = [(f"layers.{layer.layer}", layer) for layer in chunk.layers]
    return out + [(f"mtp.{k}.block", module.block) for k, module in enumerate(chunk.mtp or ())]


def embedding_table(cfg: ModelConfig, groups: ModelGroups, seed: int) -> VocabParallelEmbedding:
    """The token embedding, split by vocabulary rows over TP (padding rows zero)."""
    full = init.placeholder((cfg.vocab_size, cfg.hidden))  # values drawn per piece by build_chunks
    return VocabParallelEmbedding(
        cfg.vocab_size, cfg.hidden, group=groups.tp, sequence_parallel=groups.sequence_parallel,
        pad_to_multiple_of=cfg.vocab_pad_multiple, full_weight=full,
    )  # fmt: skip


def output_head(cfg: ModelConfig, groups: ModelGroups, seed: int) -> ColumnParallelLinear:
    """An untied output layer over the padded vocabulary; its padding rows are zero and stay zero."""
    padded = padded_vocab_size(cfg.vocab_size, groups.tp_size, cfg.vocab_pad_multiple)
    full = init.placeholder((padded, cfg.hidden))  # values drawn per piece by build_chunks
    return ColumnParallelLinear(
        cfg.hidden, padded, group=groups.tp, bias=False, sequence_parallel=groups.sequence_parallel,
        keep_gathered_input=groups.keep_gathered_input, full_weight=full,
    )  # fmt: skip


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, cfg: ModelConfig, groups: ModelGroups) -> torch.Tensor:
    """Mean next-token cross entropy of this rank's tokens: ``logits`` ``[seq, batch, V/tp]``, ``labels``
    ``[batch, seq]`` (this CP rank's part). Averaging over data- and context-parallel ranks happens in
    the gradient reduction (every rank holds as many tokens). A label of ``-100`` (packed batches: a
    document's last token, padding) has loss 0 and no gradient and still counts in the mean's denominator,
    so every rank's share of the average stays equal."""
    per_token = vocab_parallel_cross_entropy(logits, labels.t(), group=groups.tp, vocab_size=cfg.vocab_size)
    return per_token.mean()


def build_chunks(
    cfg: ModelConfig,
    groups: ModelGroups,
    *,
    pp_rank: int,
    pp: int,
    vpp: int = 1,
    seed: int,
    recompute: str | None = None,
    uneven: str | Sequence[int] | None = None,
    draw: bool = True,
    layout: str = "looped",
) -> list[GPTChunk]:
    """The ``vpp`` chunks pipeline rank ``pp_rank`` holds, in chunk order: stage ``chunk*pp + pp_rank``, or
    with ``layout="v"`` (the V schedules) stages ``pp_rank`` and ``2*pp - 1 - pp_rank``. ``uneven``: the
    layers per stage (see :func:`pp_sched.split_layers`). ``draw=False`` leaves the randomly initialised
    weights at zero (they are about to be loaded)."""
    from .seeded import draw_initial_pieces  # it reads the chunks' pieces (shards imports this module)

    stages = split_layers(cfg.layers, pp=pp, vpp=vpp, uneven=uneven, layout=layout)
    mine = sorted((s for s in stages if s.rank == pp_rank), key=lambda s: s.chunk)
    chunks = [GPTChunk(cfg, groups, s, seed=seed, recompute=recompute) for s in mine]
    if draw:
        draw_initial_pieces(chunks, seed)
    return chunks


def tied_embedding_params(chunks: list[GPTChunk]) -> list[nn.Parameter]:
    """The embedding copies whose gradients are summed over the embedding group (tied, pp > 1): the
    registered parameters (under FSDP, this rank's pieces of them)."""
    return [
        dict(c.embedding.named_parameters())["weight"]
        for c in chunks
        if c.embedding is not None and c.cfg.tied_embeddings and not (c.stage.embedding and c.stage.head)
    ]
