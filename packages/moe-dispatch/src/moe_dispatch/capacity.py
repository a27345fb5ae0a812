"""Expert capacity: dropping the tokens over it, and padding every expert's rows up to it.

With a capacity factor each expert takes at most ``capacity`` of a call's tokens. Padding then adds
tokens that were not routed to the expert, with probability zero, until it has exactly ``capacity``
rows, so every expert (and every dispatcher buffer) has a static shape. A padding row is weighted by
zero in the dispatcher's combine, so it adds nothing to the output, and its output gradient is zero,
so it adds nothing to any gradient.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Rows an expert may take: ``ceil(tokens * topk / num_experts * capacity_factor)``."""
    return math.ceil(tokens * topk / num_experts * capacity_factor)


def drop_over_capacity(
    probs: torch.Tensor, routing_map: torch.Tensor, capacity: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` tokens per expert: those with the highest probability (``"probs"``, ties
    broken by position) or the first ones in token order (``"position"``). Returns the new probs and map."""
    if policy == "position":
        keep = routing_map & (routing_map.long().cumsum(0) <= capacity)
    else:
        tokens = routing_map.size(0)
        masked = probs.detach().masked_fill(~routing_map, -1.0)
        order = torch.sort(masked, dim=0, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        positions = torch.arange(tokens, device=order.device).unsqueeze(1).expand_as(order)
        ranks.scatter_(0, order, positions)
        keep = routing_map & (ranks < capacity)
    return probs * keep, keep


def pad_to_capacity(routing_map: torch.Tensor, capacity: int) -> torch.Tensor:
    """``routing_map`` with each expert's column filled up to exactly ``capacity`` tokens (at most the
    number of tokens) by the earliest tokens not yet routed to it. Every column must hold at most
    ``capacity`` tokens already (drop first). The probabilities of the added entries stay zero."""
    capacity = min(capacity, routing_map.size(0))
    missing = capacity - routing_map.sum(0, keepdim=True)
    free = ~routing_map
    return routing_map | (free & (free.long().cumsum(0) <= missing))
