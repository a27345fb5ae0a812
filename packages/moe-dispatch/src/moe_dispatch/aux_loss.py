"""Auxiliary router losses and the autograd function that backpropagates them without being added to the loss.

:func:`attach_loss` returns its input unchanged; in backward it passes the incoming gradient through and
also gives ``loss`` the gradient ``scale``, as if ``scale * loss`` had been added to the training loss.
The caller therefore never adds the auxiliary losses to its loss by hand; their values are kept for logging.
"""

from __future__ import annotations

import torch


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
