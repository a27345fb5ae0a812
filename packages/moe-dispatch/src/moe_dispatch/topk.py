"""Choosing each token's experts: plain top-k, or group-limited top-k (DeepSeek-V3).

Group-limited routing splits the experts into ``num_groups`` equal groups of consecutive experts (for
example one group per EP rank or per node), keeps the ``topk_groups`` best groups of each token, and
takes the top ``k`` experts inside them only, so a token's rows travel to at most ``topk_groups``
groups. A group's score is the sum of its two best expert scores (one when a group has one expert),
as in DeepSeek-V3. The choice is not differentiable; the probabilities are gathered afterwards.
"""

from __future__ import annotations

import torch


def group_score_experts(experts_per_group: int) -> int:
    """How many of a group's best expert scores add up to the group's score."""
    return min(2, experts_per_group)


@torch.no_grad()
def topk_index(
    ranked: torch.Tensor, bias: torch.Tensor | None, k: int, num_groups: int = 1, topk_groups: int | None = None
) -> torch.Tensor:
    """``[tokens, k]`` indices of each token's chosen experts by ``ranked + bias`` (``[tokens, experts]``),
    limited to its ``topk_groups`` best of ``num_groups`` groups when ``topk_groups < num_groups``."""
    key = ranked if bias is None else ranked + bias.to(ranked.dtype)
    if topk_groups is not None and topk_groups < num_groups:
        tokens, experts = key.shape
        per_group = experts // num_groups
        grouped = key.view(tokens, num_groups, per_group)
        group_scores = grouped.topk(group_score_experts(per_group), dim=-1).values.sum(-1)
        best = group_scores.topk(topk_groups, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
        key = key.masked_fill(~allowed.repeat_interleave(per_group, dim=1), float("-inf"))
    return torch.topk(key, k, dim=-1).indices
