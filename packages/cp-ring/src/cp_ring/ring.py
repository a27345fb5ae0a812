"""Ring attention: key/value blocks travel around the CP group by p2p while each rank attends to them.

Forward: at step ``t`` rank ``r`` holds the keys/values of rank ``(r - t) mod cp``. It posts the transfer
of that block to the next rank (and the receive from the previous one) before computing attention
against it, so the transfer overlaps the computation; the partial outputs are merged with the
log-sum-exp rule. :mod:`cp_ring.blocks` says which part of each block is computed.

Backward: a second ring pass. Each rank recomputes every block from the saved ``q, k, v`` and the final
``out`` and ``lse``; ``dQ`` accumulates locally, while a ``dK/dV`` accumulator travels with its block (one
step behind it) and, after the last step, one more hop takes it home. Per step a rank holds one
``[b, h, s_local, s_local]`` score block at most; out, lse and the gradient accumulators are fp32.

Packed documents: with ``documents`` (each position's document id, placed like ``q``) every rank gathers the
group's ids once per call; a block's mask is "same document" between its actual query and key positions
(under zigzag they are not contiguous), on top of the causal shape of :mod:`cp_ring.blocks`, and a block in
which no query shares a document with a key is skipped in both passes.
"""

from __future__ import annotations

import torch

from pstate import Group

from .blocks import block_for
from .comm import RingPeers, all_gather, wait_all
from .errors import ContextParallelError
from .kernel import AttentionKernel
from .kernel_choice import make_kernel

_KV, _DKV = 0, 1  # message tags


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's normalised ``(out, lse)`` into the running ones, in place (views allowed)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


def _document_mask(docs: torch.Tensor | None, rank: int, source: int, block) -> torch.Tensor | None:
    """``[b, q rows, kv rows]``: where a query of ``rank``'s block shares a document with a key of ``source``'s
    (``docs``: every rank's document ids, ``[cp, b, s_local]``); ``None`` without documents."""
    if docs is None:
        return None
    return docs[rank][:, block.q].unsqueeze(-1) == docs[source][:, block.kv].unsqueeze(-2)


def _block(rank, source, cp, local_len, causal, zigzag, docs):
    """The block to compute against ``source``'s keys and its document mask, or ``(None, None)``: skip."""
    block = block_for(rank, source, cp, local_len, causal=causal, zigzag=zigzag)
    mask = None if block is None else _document_mask(docs, rank, source, block)
    if mask is not None and not bool(mask.any()):
        return None, None
    return block, mask


def _forward(q, k, v, peers: RingPeers, causal, scale, zigzag, kernel: AttentionKernel, docs):
    cp, rank, local_len = peers.size, peers.rank, q.size(2)
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(cp):
        received, requests = peers.shift({_KV: kv} if step + 1 < cp else {})
        block, mask = _block(rank, (rank - step) % cp, cp, local_len, causal, zigzag, docs)
        if block is not None:
            rows = (slice(None), slice(None), block.q)
            keys = (slice(None), slice(None), block.kv)
            block_out, block_lse = kernel.forward(
                q[rows], kv[0][keys], kv[1][keys], causal=block.causal, scale=scale, **_masked(mask)
            )
            if out is None:  # step 0 is the diagonal block, which covers every query row
                out, lse = block_out.float(), block_lse.float()
            else:
                _merge(out[rows], lse[rows], block_out.float(), block_lse.float())
        wait_all(requests)
        kv = received.get(_KV)
    return out, lse


def _masked(mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The kernel's ``mask`` keyword, only when there is one: a plug-in kernel without the keyword still runs
    attention without documents."""
    return {} if mask is None else {"mask": mask}


def _backward(dout, q, k, v, out, lse, peers: RingPeers, causal, scale, zigzag, kernel: AttentionKernel, docs):
    cp, rank, local_len = peers.size, peers.rank, q.size(2)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    dkv = None  # the gradient accumulator of the block held at the previous step
    for step in range(cp):
        sends = {_KV: kv} if step + 1 < cp else {}
        if dkv is not None:
            sends[_DKV] = dkv
        received, requests = peers.shift(sends)
        local = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        block, mask = _block(rank, (rank - step) % cp, cp, local_len, causal, zigzag, docs)
        if block is not None:
            rows = (slice(None), slice(None), block.q)
            keys = (slice(None), slice(None), block.kv)
            grads = kernel.backward(
                dout[rows], q[rows], kv[0][keys], kv[1][keys], out[rows], lse[rows], causal=block.causal,
                scale=scale, **_masked(mask),
            )  # fmt: skip
            dq[rows] += grads[0]
            local[0][keys] += grads[1]
            local[1][keys] += grads[2]
        wait_all(requests)
        kv = received.get(_KV)
        dkv = local if _DKV not in received else local.add_(received[_DKV])
    if cp > 1:  # the accumulator now holds every rank's contribution: one hop takes it home
        received, requests = peers.shift({_DKV: dkv})
        wait_all(requests)
        dkv = received[_DKV]
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, zigzag, kernel, docs):  # type: ignore[override]
        peers = RingPeers(group)
        out, lse = _forward(q, k, v, peers, causal, scale, zigzag, kernel, docs)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (peers, causal, scale, zigzag, kernel, docs)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """Raise :class:`ContextParallelError` unless ``q, k, v`` are SDPA-layout tensors that fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ContextParallelError(
            f"{what}: q, k, v must be [batch, heads, seq, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.size(0) != k.size(0) or q.size(2) != k.size(2) or q.size(3) != k.size(3):
        raise ContextParallelError(
            f"{what}: k and v must have equal shapes and match q in batch, local seq and head_dim; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.size(1) % k.size(1):
        raise ContextParallelError(
            f"{what}: {q.size(1)} query heads are not a multiple of {k.size(1)} key/value heads (GQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ContextParallelError(f"{what}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group,
    causal: bool = True,
    scale: float | None = None,
    zigzag: bool = True,
    kernel: AttentionKernel | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the whole sequence from this rank's part of it, by a ring of p2p transfers.

    ``q``: ``[batch, heads, seq_local, head_dim]``; ``k``, ``v``: ``[batch, kv_heads, seq_local, head_dim]``
    (``heads`` a multiple of ``kv_heads`` for grouped-query attention), each this rank's part of the
    sequence as placed by :func:`~cp_ring.shard_sequence` with the same ``zigzag``. Returns this rank's
    part of the output, in ``q``'s dtype (fp32 accumulation inside). ``scale`` defaults to
    ``head_dim ** -0.5``. ``kernel`` computes each block (default: ``make_kernel("auto", q.device)``,
    :class:`~cp_ring.SDPAKernel` on CPU and CUDA, :class:`~cp_ring.MathKernel` elsewhere).
    Differentiable: the backward is a second ring pass. ``documents`` (packed sequences):
    ``[batch, seq_local]`` integer document ids of this rank's positions, sharded like ``q``; a query
    then sees only keys of its own document.
    """
    check_qkv(q, k, v, "ring_attention")
    check_documents(documents, q, "ring_attention")
    peers = RingPeers(group)
    if causal and zigzag and peers.size > 1 and q.size(2) % 2:
        raise ContextParallelError(
            f"ring_attention: local sequence length {q.size(2)} is odd; a zigzag part holds two equal chunks"
        )
    scale = q.size(-1) ** -0.5 if scale is None else scale
    docs = None if documents is None else torch.stack(all_gather(documents, 0, peers.group))
    kernel = kernel or make_kernel("auto", q.device)
    return _RingAttention.apply(q, k, v, peers.group, causal, scale, zigzag, kernel, docs)


def check_documents(documents: torch.Tensor | None, q: torch.Tensor, what: str) -> None:
    """Raise :class:`ContextParallelError` unless ``documents`` is ``None`` or integer ``[batch, seq_local]``."""
    if documents is None:
        return
    if documents.is_floating_point() or tuple(documents.shape) != (q.size(0), q.size(2)):
        raise ContextParallelError(
            f"{what}: documents must be integer ids of shape [batch, seq_local] = {(q.size(0), q.size(2))}; got "
            f"{documents.dtype} {tuple(documents.shape)}"
        )
