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

from .kernel import AttentionKernel
from .ring import ring_attention
from .ulysses import over_heads

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
    hint = "use a smaller all-to-all group (cp_a2a) or ring_attention"

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
        return ring_attention(
            q, k, v, group=ring_group, causal=causal, scale=scale, zigzag=zigzag, kernel=kernel, documents=docs
        )

    return over_heads(attend, q, k, v, a2a_group, causal=causal, zigzag=zigzag, documents=documents,
                      what=_WHAT, ranks="the all-to-all group's {size} ranks", hint=hint)  # fmt: skip
