"""All-to-all (Ulysses) attention: trade sequence sharding for head sharding around one full attention.

An all-to-all turns this rank's ``[b, h, s/cp, d]`` part into ``[b, h/cp, s, d]`` (every position, head
slice ``r``), full-sequence ``scaled_dot_product_attention`` runs on those heads, and the inverse
all-to-all brings the output back. The all-to-all gathers the sequence in group-rank order; under zigzag
placement that is not the global order, so for causal attention the gathered chunks are permuted into
global order before attention and back after it (a local index_select each way). Non-causal attention
does not depend on the order of positions and skips the permutation.

Packed documents: the document ids of every rank's positions are all-gathered in the same rank order (and
permuted the same way), so after the all-to-all the full sequence's ids are known and attention takes the
explicit mask "same document" (and causal) instead of ``is_causal``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pstate import Group

from . import comm
from .all_to_all import all_to_all
from .errors import ContextParallelError
from .ring import check_documents, check_qkv


def zigzag_permutation(cp: int, chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a zigzag-placed sequence of ``2*cp`` chunks of ``chunk`` positions gathered in group-rank order
    (as an all-to-all gathers it): the index that puts it in global order (``index_select`` with it), and
    the inverse index that puts a globally ordered sequence back in rank order."""
    positions = torch.arange(2 * cp * chunk, device=device).view(2 * cp, chunk)
    rank_order = torch.cat([torch.stack([positions[r], positions[2 * cp - 1 - r]]) for r in range(cp)])
    to_rank_order = rank_order.reshape(-1)  # rank-order slot i holds global position to_rank_order[i]
    to_global = torch.empty_like(to_rank_order)
    to_global[to_rank_order] = torch.arange(to_rank_order.numel(), device=device)
    return to_global, to_rank_order


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group,
    causal: bool = True,
    scale: float | None = None,
    zigzag: bool = True,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the whole sequence from this rank's part, by all-to-all head sharding.

    Same layout and placement contract as :func:`~cp_ring.ring_attention` (``zigzag`` must match how the
    sequence was sharded). ``heads`` and ``kv_heads`` must both divide by the CP size. Differentiable
    (autograd through the all-to-alls and ``scaled_dot_product_attention``). ``documents``: as for
    :func:`~cp_ring.ring_attention`.
    """
    hint = "use ring_attention, or a head count that is a multiple of cp"

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
        if k.size(1) != q.size(1):
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        if docs is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(docs, causal), scale=scale)

    return over_heads(attend, q, k, v, group, causal=causal, zigzag=zigzag, documents=documents,
                      what="ulysses_attention", ranks="cp={size} ranks", hint=hint)  # fmt: skip


def over_heads(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    *,
    causal: bool,
    zigzag: bool,
    documents: torch.Tensor | None,
    what: str,
    ranks: str,
    hint: str,
) -> torch.Tensor:
    """Run ``attend(q, k, v, documents)`` on ``group``'s positions with ``1/size`` of the heads: the checks,
    the all-to-all from sequence to head sharding (and the documents' all-gather), the zigzag permutation
    into sequence order for causal attention, and the way back. Ulysses' ``attend`` is one full attention;
    hierarchical CP's is ring attention across the inner groups. The head-count refusal names the group as
    ``ranks`` (``{size}`` filled in) and ends with ``hint``."""
    check_qkv(q, k, v, what)
    check_documents(documents, q, what)
    size, _ = comm.size_and_rank(group)
    for name, heads in (("query", q.size(1)), ("key/value", k.size(1))):
        if heads % size:
            raise ContextParallelError(
                f"{what}: {heads} {name} heads do not divide evenly over {ranks.format(size=size)}; {hint}"
            )
    reorder = causal and zigzag and size > 1
    if reorder and q.size(2) % 2:
        raise ContextParallelError(
            f"{what}: local sequence length {q.size(2)} is odd; a zigzag part holds two equal chunks"
        )
    q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=2, group=group, what=what) for t in (q, k, v))
    if documents is not None and size > 1:
        documents = torch.cat(comm.all_gather(documents, 1, group), dim=1)
    if reorder:
        to_sequence, to_rank_order = zigzag_permutation(size, q.size(2) // (2 * size), q.device)
        q, k, v = (t.index_select(2, to_sequence) for t in (q, k, v))
        documents = None if documents is None else documents.index_select(1, to_sequence)
    out = attend(q, k, v, documents)
    if reorder:
        out = out.index_select(2, to_rank_order)
    return all_to_all(out, scatter_dim=2, gather_dim=1, group=group, what=what)


def document_mask(documents: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The boolean SDPA mask ``[batch, 1, seq, seq]`` of packed ``documents`` (``[batch, seq]`` ids in sequence
    order): a query sees the keys of its own document (the earlier ones, when ``causal``)."""
    mask = documents.unsqueeze(-1) == documents.unsqueeze(-2)
    if causal:
        seq = documents.size(-1)
        mask &= torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril_()
    return mask.unsqueeze(1)
