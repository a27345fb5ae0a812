"""``VocabParallelEmbedding``: an embedding table split by vocabulary rows over a TP group."""

from __future__ import annotations

import torch
from torch import nn

from pstate import Group

from . import comm, init
from .errors import TensorParallelError
from .mappings import reduce_from_region, reduce_scatter_to_sequence_region
from .params import mark_tensor_parallel


def padded_vocab_size(num_embeddings: int, tp: int, multiple: int = 1) -> int:
    """``num_embeddings`` rounded up to a multiple of ``multiple * tp``, so every rank holds as many rows."""
    step = multiple * tp
    return -(-num_embeddings // step) * step


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows are split over ``group``: rank ``r`` holds rows ``[r*V/tp, (r+1)*V/tp)`` of
    the table padded to ``V = padded_vocab_size(num_embeddings, tp, pad_to_multiple_of)`` rows.

    Each rank looks up the ids in its range, contributes zeros for the others, and the results are summed
    over the group; with ``sequence_parallel`` they are reduce-scattered along dimension 0 instead, so
    ``ids`` must then be ``[seq, batch]`` and the output is ``[seq/tp, batch, dim]``. Otherwise the output
    has the shape ``ids.shape + (embedding_dim,)``, as ``nn.Embedding``'s.

    The padding rows are zero and no valid id reaches them; pass ``vocab_size=num_embeddings`` to
    :func:`vocab_parallel_cross_entropy` so that the logits of a tied output layer ignore them too.

    Initialisation: the full ``[num_embeddings, dim]`` table is drawn like ``nn.Embedding``'s (normal,
    std 1, from ``seed`` or the default CPU generator) unless ``init_method`` or ``full_weight`` is given.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: Group,
        sequence_parallel: bool = False,
        pad_to_multiple_of: int = 1,
        init_method: init.InitMethod | None = None,
        seed: int | None = None,
        full_weight: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group, self.tp, rank = group, comm.size_of(group), comm.rank_in(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        self.padded_num_embeddings = padded_vocab_size(num_embeddings, self.tp, pad_to_multiple_of)
        rows = self.padded_num_embeddings // self.tp
        self.vocab_start, self.vocab_end = rank * rows, (rank + 1) * rows
        if full_weight is not None:
            if tuple(full_weight.shape) != (num_embeddings, embedding_dim):
                raise TensorParallelError(
                    f"VocabParallelEmbedding: full_weight has shape {tuple(full_weight.shape)}, "
                    f"expected {(num_embeddings, embedding_dim)}"
                )
            table = full_weight.detach().to(init.host(full_weight), torch.float32)
        else:
            fill = init_method or init.normal_init(1.0)
            table = init.draw((num_embeddings, embedding_dim), fill, init.generator_for(seed))
        weight = torch.zeros(self.vocab_end - self.vocab_start, embedding_dim)  # padding rows stay zero
        stop = min(self.vocab_end, num_embeddings)
        if stop > self.vocab_start:
            weight[: stop - self.vocab_start] = table[self.vocab_start : stop]
        self.weight = nn.Parameter(weight.to(device=device, dtype=dtype or torch.get_default_dtype()))
        mark_tensor_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return nn.functional.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = nn.functional.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(partial, group=self.group)
        return reduce_from_region(partial, group=self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padded={self.padded_num_embeddings}, tp={self.tp}, "
            f"rows=[{self.vocab_start}, {self.vocab_end}), sequence_parallel={self.sequence_parallel}"
        )
