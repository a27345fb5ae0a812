"""``ModelRunner``: one packed step of the model over a paged KV cache, at any TP size.

The runner drives the model's parts itself (embedding, layers with a :class:`PagedLayer` each, final
norm and head), so the chunk's training forward stays as it is: positions come from the step (each
token its own), and only the rows that are sampled reach the norm and the head. At TP > 1 every rank
of the TP group holds its heads' share of the pool and runs every step: the first rank (the driver)
broadcasts the step's segments, the others follow in :meth:`ModelRunner.follow`, and the vocabulary
slices of the logits are gathered on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from pstate import as_group

from ..errors import TrainerError
from ..model import GPTChunk
from .paged import BlockPool, PagedBatch, Segment


class ModelRunner:
    """The whole model ``chunk`` (one pipeline stage, no SP or CP) and its pool of ``num_blocks`` blocks."""

    def __init__(self, chunk: GPTChunk, *, num_blocks: int, block_size: int) -> None:
        groups = chunk.groups
        if not (chunk.stage.embedding and chunk.stage.head):
            raise TrainerError("inference runs the whole model in one pipeline stage (pp=1)")
        if groups.cp_size > 1 or groups.sequence_parallel:
            raise TrainerError("inference runs at cp=1 without sequence parallelism")
        if chunk.cfg.layer_pattern is not None:
            raise TrainerError(
                f"model.layer_pattern={chunk.cfg.layer_pattern!r}: the paged engine serves attention-only models; "
                "use trainer generate for hybrid Mamba models"
            )
        self.chunk, self.cfg, self.tp = chunk.eval(), chunk.cfg, groups.tp_size
        weight = next(chunk.parameters())
        self.device = weight.device
        cfg, mla = self.cfg, self.cfg.attention == "mla"
        self.pool = BlockPool(
            layers=len(chunk.layers), num_blocks=num_blocks, block_size=block_size,
            kv_heads=1 if mla else cfg.num_kv_heads // self.tp, latent=mla,
            head_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim if mla else cfg.head_dim,
            dtype=weight.dtype, device=weight.device,
        )  # fmt: skip
        self._group = as_group(groups.tp)
        self._driver = dist.get_global_rank(self._group, 0) if self.tp > 1 else 0

    @property
    def is_driver(self) -> bool:
        return self.chunk.groups.tp_rank == 0

    def run(self, segments: Sequence[Segment], sample: Sequence[bool]) -> torch.Tensor:
        """Logits ``[sum(sample), vocab]`` (float32) after the last token of each segment marked in
        ``sample``; on the driver, the followers run the same step."""
        if self.tp > 1:
            dist.broadcast_object_list([(list(segments), list(sample))], src=self._driver, group=self._group)
        return self._forward(segments, sample)

    def follow(self) -> None:
        """On a follower: run the driver's steps until it calls :meth:`stop`."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=self._driver, group=self._group)
            if box[0] is None:
                return
            self._forward(*box[0])

    def stop(self) -> None:
        """On the driver: release the followers from :meth:`follow`."""
        if self.tp > 1:
            dist.broadcast_object_list([None], src=self._driver, group=self._group)

    @torch.no_grad()
    def _forward(self, segments: Sequence[Segment], sample: Sequence[bool]) -> torch.Tensor:
        chunk = self.chunk
        batch = PagedBatch(segments, self.pool, self.device)
        if batch.position_list and max(batch.position_list) >= self.cfg.max_seq_len:
            raise TrainerError(f"position {max(batch.position_list)} is past model.max_seq_len={self.cfg.max_seq_len}")
        h = chunk.embedding(batch.ids.t())  # [tokens, 1, hidden]
        if chunk.position is not None:
            h = h + chunk.position[batch.positions()].unsqueeze(1)
        for i, layer in enumerate(chunk.layers):
            h = layer(h, batch.layer(i))
        ends = [batch.offsets[i] + len(s.ids) - 1 for i, s in enumerate(segments) if sample[i]]
        if not ends:
            return torch.empty(0, self.cfg.vocab_size, device=self.device)
        h = h[torch.tensor(ends, device=self.device)]
        logits = chunk.logits(chunk.final_norm(h))[:, 0].float()  # [rows, padded vocab / tp]
        if self.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits.contiguous(), group=self._group)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.cfg.vocab_size]
