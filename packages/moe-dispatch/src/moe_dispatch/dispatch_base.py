"""What both dispatchers share: the expert placement over EP, and permuting tokens by expert and back."""

from __future__ import annotations

import torch

from .comm import GroupOrNone, rank_in, size_of
from .errors import MoEError


class Dispatcher:
    """Base of the dispatchers: EP rank ``r`` holds global experts ``r*E/ep`` to ``(r+1)*E/ep - 1``.

    ``ep_group`` / ``etp_group`` are ``pstate`` axes, process groups, or ``None`` for a single rank.
    ``dispatch`` keeps what ``combine`` needs on the instance, so calls alternate: one ``dispatch``,
    then its ``combine``.
    """

    def __init__(self, num_experts: int, *, ep_group: GroupOrNone, etp_group: GroupOrNone = None) -> None:
        ep = size_of(ep_group)
        if num_experts < 1 or num_experts % ep:
            raise MoEError(f"num_experts={num_experts}: must be a positive multiple of the expert-parallel size {ep}")
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep, self.etp = ep, size_of(etp_group)
        self.num_local_experts = num_experts // ep
        self.first_expert = rank_in(ep_group) * self.num_local_experts

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_input, tokens_per_expert)``: this rank's expert rows grouped by local expert, and the
        number of rows of each local expert (int64, ``[num_local_experts]``)."""
        raise NotImplementedError

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]``: each token's probability-weighted sum of its experts' outputs."""
        raise NotImplementedError

    def check_inputs(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        """Raise :class:`MoEError` unless the shapes agree with each other and with ``num_experts``."""
        expected = (hidden.size(0), self.num_experts)
        if hidden.dim() != 2 or tuple(probs.shape) != expected or tuple(routing_map.shape) != expected:
            raise MoEError(
                f"dispatch: hidden {tuple(hidden.shape)} must be [tokens, hidden] and probs {tuple(probs.shape)} "
                f"and routing_map {tuple(routing_map.shape)} must be [tokens, num_experts] = {list(expected)}"
            )
        if routing_map.dtype != torch.bool:
            raise MoEError(f"dispatch: routing_map must be bool, not {routing_map.dtype}")


def permute(routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_index, expert_index)`` of every routed (token, expert) pair, ordered by expert then token."""
    expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
    return token_index, expert_index


def weighted_scatter(rows: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[tokens, hidden]`` with ``weights[i] * rows[i]`` summed into row ``token_index[i]``."""
    out = rows.new_zeros((tokens, rows.size(1)))
    return out.index_add(0, token_index, rows * weights.unsqueeze(1).to(rows.dtype))
