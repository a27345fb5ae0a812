"""Hierarchical context parallelism: all-to-all over heads inside a small group, ring attention across groups.

The CP group of ``cp = a * r`` ranks is cut into ``r`` inner groups of ``a`` adjacent CP ranks (CP rank
``c = j * a + i``: inner rank ``i`` of inner group ``j``) and ``a`` outer rings of ``r`` ranks (the
ranks with the same inner rank ``i``). Megatron calls this ``a2a+p2p``: the cheap, bandwidth-hungry
all-to-all stays on the fast links between neighbours (inside a node), and only the ring's p2p transfers,
which overlap with computation, cross the slow links.

Why the placement composes: under zigzag over ``cp`` ranks, CP rank ``c`` holds chunks ``c`` and
``2cp-1-c`` of ``2cp``. Inner group ``j`` holds chunks ``ja .. ja+a-1`` and ``2cp-1-ja-(a-1) .. 2cp-1-ja``
between its members: exactly chunks ``j`` and ``2r-1-j`` of the same sequence cut into ``2r`` chunks, the
zigzag part of ring rank ``j``. The all-to-all gathers those pieces in inner-rank order, which is the
zigzag placement of ``2a`` chunks over ``a`` ranks; :func:`~cp_ring.zigzag_permutation` puts them in
order, and the ring then runs on a zigzag part with ``a`` times fewer heads and ``a`` times more positions.
Under contiguous placement the gathered pieces are already ring rank ``j``'s contiguous chunk.
"""

from __future__ import annotations

import torch

from pstate import Group

from . import comm
from .all_to_all import all_to_all
from .errors import ContextParallelError
from .kernel import AttentionKernel
from .ring import check_documents, check_qkv, ring_attention
from .ulysses import zigzag_permutation

_WHAT = "hierarchical_attention"


def hierarchical_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    a2a_group: Group,
    ring_group: Group,
    causal: bool = True,
    scale: float | None = None,
    zigzag: bool = True,
    kernel: AttentionKernel | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the whole sequence from this rank's part: all-to-all over heads in ``a2a_group``,
    ring attention over ``ring_group``, and the inverse all-to-all.

    Layout contract: the sequence is placed (by :func:`~cp_ring.shard_sequence`, with this ``zigzag``)
    over a CP group of ``cp = a * r`` ranks in which CP rank ``c`` is rank ``c % a`` of ``a2a_group``
    (``a`` ranks: CP ranks ``c - c % a`` to ``c - c % a + a - 1``) and rank ``c // a`` of ``ring_group``
    (``r`` ranks: CP ranks ``c % a``, ``c % a + a``, ...). ``pstate`` gives these groups as ``ps.cp_a2a``
    and ``ps.cp_ring`` (``ParallelConfig(cp=..., cp_a2a=a)``).

    ``q``: ``[batch, heads, seq_local, head_dim]``; ``k, v``: ``[batch, kv_heads, seq_local, head_dim]``
    (grouped-query attention when ``kv_heads < heads``); ``heads`` and ``kv_heads`` must divide by ``a``.
    Returns this rank's part of the output in ``q``'s layout and dtype. ``scale``, ``kernel`` and
    ``documents`` (``[batch, seq_local]`` packed-document ids, placed like ``q``) mean what they mean for
    :func:`~cp_ring.ring_attention`; ``a = 1`` is ring attention, ``r = 1`` is Ulysses attention.
    Differentiable (autograd through the all-to-alls and the ring's own backward).
    """
    check_qkv(q, k, v, _WHAT)
    check_documents(documents, q, _WHAT)
    a, _ = comm.size_and_rank(a2a_group)
    for name, heads in (("query", q.size(1)), ("key/value", k.size(1))):
        if heads % a:
            raise ContextParallelError(
                f"{_WHAT}: {heads} {name} heads do not divide evenly over the all-to-all group's {a} ranks; "
                "use a smaller all-to-all group (cp_a2a) or ring_attention"
            )
    reorder = causal and zigzag and a > 1
    if reorder and q.size(2) % 2:
        raise ContextParallelError(
            f"{_WHAT}: local sequence length {q.size(2)} is odd; a zigzag part holds two equal chunks"
        )
    q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=2, group=a2a_group, what=_WHAT) for t in (q, k, v))
    if documents is not None and a > 1:
        documents = torch.cat(comm.all_gather(documents, 1, a2a_group), dim=1)
    if reorder:
        to_ring_part, to_rank_order = zigzag_permutation(a, q.size(2) // (2 * a), q.device)
        q, k, v = (t.index_select(2, to_ring_part) for t in (q, k, v))
        documents = None if documents is None else documents.index_select(1, to_ring_part)
    out = ring_attention(
        q, k, v, group=ring_group, causal=causal, scale=scale, zigzag=zigzag, kernel=kernel, documents=documents
    )
    if reorder:
        out = out.index_select(2, to_rank_order)
    return all_to_all(out, scatter_dim=2, gather_dim=1, group=a2a_group, what=_WHAT)
