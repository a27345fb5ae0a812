"""Auxiliary router losses and the autograd function that backpropagates them without being added to the loss.

:func:`attach_loss` returns its input unchanged; in backward it passes the incoming gradient through and
also gives ``loss`` the gradient ``scale``, as if ``scale * loss`` had been added to the training loss.
The caller therefore never adds the auxiliary losses to its loss by hand; their values are kept for logging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pstate import comm


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.scale = scale
        ctx.loss_shape = loss.shape
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.loss_shape, ctx.scale), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged; backward through the result also backpropagates ``scale * loss``.

    ``x`` must be on the path to the training loss (its gradient is what triggers the extra backward).
    """
    return _AttachLoss.apply(x, loss, scale)


def load_balancing_loss(scores: torch.Tensor, routing_map: torch.Tensor, topk: int, coeff: float) -> torch.Tensor:
    """Switch-transformer load-balancing loss over this batch of tokens.

    ``coeff * E * sum_e f_e * P_e`` where ``f_e`` is the fraction of the ``tokens * topk`` routing slots
    that went to expert ``e`` (not differentiable) and ``P_e`` the mean score of expert ``e`` over the
    tokens (``scores`` are the full per-token distribution over all experts, rows summing to one).
    Equal to ``coeff`` when both are uniform.
    """
    tokens, experts = scores.shape
    if tokens == 0:
        return scores.sum() * 0.0
    fraction = routing_map.sum(0).to(scores.dtype) / (tokens * topk)
    mean_score = scores.sum(0) / tokens
    return coeff * experts * (fraction * mean_score).sum()


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``coeff * mean_t(logsumexp_e(logits[t])**2)``; keeps the logits small."""
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


def sequence_aux_losses(
    logits: torch.Tensor,
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    *,
    aux_loss_coeff: float,
    z_loss_coeff: float,
    group: dist.ProcessGroup | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The load-balancing and z-losses (those with a coefficient > 0) of the tokens of every rank of
    ``group`` (the ranks that hold other tokens of the same sequences: TP under sequence parallelism,
    CP), by name: ``(share, whole)``. ``share`` is this rank's term, the one to backpropagate: the
    shares add up over ``group`` to the loss of all the tokens, so their gradients are that loss's.
    ``whole`` is that loss (detached; for logging). One all-reduce of ``2 * experts + 2`` numbers.
    Without ``group`` both are :func:`load_balancing_loss` and :func:`z_loss` of this rank's tokens."""
    experts = scores.size(1)
    lse2 = torch.logsumexp(logits.float(), dim=-1).square() if z_loss_coeff > 0 else logits.new_zeros(0)
    score_sums = scores.float().sum(0)
    tokens = score_sums.new_full((1,), float(logits.size(0)))
    stats = torch.cat([routing_map.sum(0).float(), score_sums.detach(), tokens, lse2.detach().sum().reshape(1)])
    if group is not None:
        comm.all_reduce(stats, group=group)
    counts, all_score_sums = stats[:experts], stats[experts : 2 * experts]
    tokens = stats[-2].clamp(min=1.0)
    out = {}
    if aux_loss_coeff > 0:
        fraction = counts / (tokens * topk)
        scale = aux_loss_coeff * experts / tokens
        share = scale * (fraction * score_sums).sum()
        out["load_balancing"] = (share.to(scores.dtype), (scale * (fraction * all_score_sums).sum()).to(scores.dtype))
    if z_loss_coeff > 0:
        out["z_loss"] = ((z_loss_coeff * lse2.sum() / tokens).to(logits.dtype), (z_loss_coeff * stats[-1] / tokens))
    return out
