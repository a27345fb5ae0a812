"""The local attention kernel switch: the per-block attention the ring runs, behind one small protocol.

A kernel computes attention of one query block against one key/value block and returns the output
together with the log-sum-exp of each query row's scores, so that the ring can merge blocks; its backward
recomputes the block from saved inputs and the *final* (merged) output and log-sum-exp, as flash
attention does. Two kernels ship: :class:`MathKernel` here (plain PyTorch, any device) and
:class:`~cp_ring.SDPAKernel` (PyTorch's fused SDPA ops, CPU and CUDA). Plug in another (a
flash-attention or Transformer Engine kernel) by passing any object with these two methods as ``kernel=``;
the ring logic does not change.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AttentionKernel(Protocol):
    """Block attention in the SDPA layout. ``q``: ``[b, hq, sq, d]``; ``k``, ``v``: ``[b, hkv, sk, d]``
    with ``hq`` a multiple of ``hkv`` (query head ``i`` uses key/value head ``i // (hq // hkv)``).
    ``causal`` is only asked for square blocks (``sq == sk``, query ``i`` sees keys ``0..i``).
    ``mask`` (packed documents): a boolean ``[b, sq, sk]``, ``True`` where the query may see the key, on top of
    ``causal``; a query row that sees no key of the block gets ``out`` 0 and ``lse`` ``-inf``.
    Inputs may be fp32 or bf16 and need not be contiguous."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: ``out`` ``[b, hq, sq, d]`` and ``lse`` ``[b, hq, sq]``, both fp32."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` in fp32 for this block, given the final ``out`` and ``lse`` of these query rows
        (probabilities are ``exp(scale * q k^T - lse)``) and the output gradient ``dout``. ``dk`` and ``dv``
        have ``hkv`` heads: grouped query heads are summed."""
        ...


class MathKernel:
    """Plain PyTorch matmul + softmax in fp32, on any device: the reference the fused kernel is tested
    against, and the fallback where no fused op runs.

    Grouped query heads are folded into the row dimension (``[b, hkv, g*sq, d]``), so K/V are never
    repeated and the key/value gradients come out summed over the group. Per call it holds one fp32
    ``[b, hq, sq, sk]`` score block (two in the backward).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, sq, _ = q.shape
        kf, vf = k.float(), v.float()
        qf = _fold(q.float(), k.size(1))
        scores = _scores(qf, kf, sq, causal, scale, mask)
        lse = torch.logsumexp(scores, dim=-1)
        seen = lse if mask is None else lse.masked_fill(lse == float("-inf"), 0.0)  # rows that see no key: 0
        probs = scores.sub_(seen.unsqueeze(-1)).exp_()
        out = torch.matmul(probs, vf)
        return _unfold(out, hq), lse.reshape(b, hq, sq)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, sq, hkv = q.size(1), q.size(2), k.size(1)
        kf, vf = k.float(), v.float()
        qf, do = _fold(q.float(), hkv), _fold(dout.float(), hkv)
        delta = (do * _fold(out.float(), hkv)).sum(-1, keepdim=True)  # rowsum(dO * O)
        probs = _scores(qf, kf, sq, causal, scale, mask).sub_(_fold(lse.float().unsqueeze(-1), hkv)).exp_()
        dv = torch.matmul(probs.transpose(-1, -2), do)
        dscores = torch.matmul(do, vf.transpose(-1, -2)).sub_(delta).mul_(probs).mul_(scale)
        del probs
        dq = torch.matmul(dscores, kf)
        dk = torch.matmul(dscores.transpose(-1, -2), qf)
        return _unfold(dq, hq), dk, dv


def repeat_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``[b, hkv, s, e]`` -> ``[b, hq, s, e]``: each key/value head repeated for its query heads."""
    groups = hq // x.size(1)
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def sum_groups(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[b, hq, s, e]`` -> ``[b, hkv, s, e]``: gradients of repeated key/value heads summed back."""
    b, hq, s, e = x.shape
    return x.view(b, hkv, hq // hkv, s, e).sum(2) if hq != hkv else x


def _fold(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[b, hq, s, e]`` -> ``[b, hkv, g*s, e]``: the ``g`` query heads of a key/value head as one row block."""
    b, hq, s, e = x.shape
    return x.reshape(b, hkv, (hq // hkv) * s, e)


def _unfold(x: torch.Tensor, hq: int) -> torch.Tensor:
    b, _, rows, e = x.shape
    return x.reshape(b, hq, rows * x.size(1) // hq, e)


def _scores(
    qf: torch.Tensor, kf: torch.Tensor, sq: int, causal: bool, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * q k^T`` as ``[b, hkv, g*sq, sk]`` fp32, with ``-inf`` above the diagonal when causal and
    where ``mask`` (``[b, sq, sk]``) is ``False``."""
    scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)
    b, hkv, rows, sk = scores.shape
    if causal:
        above = torch.ones(sq, sk, dtype=torch.bool, device=qf.device).triu_(1)
        scores.view(b, hkv, rows // sq, sq, sk).masked_fill_(above, float("-inf"))
    if mask is not None:
        scores.view(b, hkv, rows // sq, sq, sk).masked_fill_(~mask[:, None, None], float("-inf"))
    return scores
