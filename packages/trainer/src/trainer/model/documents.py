"""Packed batches: each sample holds several documents, and attention, positions and targets stay inside each.

A packed micro-batch travels through the model as one integer tensor ``documents`` of shape ``[2, batch, seq]``
beside the token ids: row 0 is each token's document id within its sample (ids do not decrease along the
sequence), row 1 its position within its document (0 at each document's first token). Under context
parallelism it is sharded along dimension 2 exactly as the token ids are (zigzag), so each CP rank holds the
ids and positions of the tokens it holds; pipeline stages pass it on beside the hidden states.
"""

from __future__ import annotations

import torch


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, for ``[batch, seq]`` document ids of whole sequences."""
    seq = doc_ids.size(-1)
    index = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - first


def documents_tensor(doc_ids: torch.Tensor) -> torch.Tensor:
    """The ``[2, batch, seq]`` int64 ``documents`` tensor the model takes, from whole sequences' document ids."""
    doc_ids = doc_ids.long()
    return torch.stack([doc_ids, document_positions(doc_ids)])
