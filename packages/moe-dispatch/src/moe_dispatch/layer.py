"""``MoELayer``: router, dispatcher and experts; a drop-in for a dense MLP on ``[seq, batch, hidden]``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pstate.tags import is_expert_parallel

from .comm import GroupOrNone, size_of
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoall import AllToAllDispatcher
from .errors import MoEError
from .experts import GroupedExperts
from .router import TopKRouter, check_router_args

DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}


class MoELayer(nn.Module):
    """Mixture of ``num_experts`` MLP experts with top-``topk`` routing, experts spread over ``ep_group``
    (EP rank ``r`` holds experts ``r*E/ep`` to ``(r+1)*E/ep - 1``) and each split over ``etp_group``.

    The router is replicated (its gradient is reduced over the dense data-parallel group). The expert
    weights are tagged ``expert_parallel = True`` (see :func:`expert_parallel_params`): reduce their
    gradients over the ``edp`` group instead. Each rank routes its own tokens, so the router's auxiliary
    losses and any capacity are per rank's batch. After each forward, ``tokens_per_expert`` holds this
    rank's token count per global expert (after dropping) and ``local_tokens_per_expert`` the rows each
    local expert processed. Router options (``score``, ``aux_loss_coeff``, ``capacity_factor``, ...) are
    passed to :class:`TopKRouter`.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        topk: int,
        *,
        dispatcher: str = "alltoall",
        ep_group: GroupOrNone = None,
        etp_group: GroupOrNone = None,
        activation: str = "swiglu",
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        if dispatcher not in DISPATCHERS:
            raise MoEError(f"dispatcher={dispatcher!r}: must be one of {tuple(DISPATCHERS)}")
        check_router_args(
            num_experts,
            topk,
            router_options.get("score", "softmax"),
            router_options.get("pre_softmax", False),
            router_options.get("capacity_factor"),
            router_options.get("drop_policy", "probs"),
        )
        etp = size_of(etp_group)
        if ffn_hidden % etp:
            raise MoEError(f"ffn_hidden={ffn_hidden}: must be divisible by the expert-tensor-parallel size {etp}")
        self.dispatcher = DISPATCHERS[dispatcher](num_experts, ep_group=ep_group, etp_group=etp_group)
        self.router = TopKRouter(hidden, num_experts, topk, seed=seed, dtype=dtype, device=device, **router_options)
        self.experts = GroupedExperts(
            self.dispatcher.num_local_experts,
            hidden,
            ffn_hidden,
            activation=activation,
            etp_group=etp_group,
            first_expert=self.dispatcher.first_expert,
            seed=None if seed is None else seed + 1,
            dtype=dtype,
            device=device,
        )
        self.tokens_per_expert: torch.Tensor | None = None
        self.local_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[seq, batch, hidden]`` in, the same shape out."""
        tokens = x.reshape(-1, x.size(-1))
        probs, routing_map = self.router(tokens)
        expert_input, counts = self.dispatcher.dispatch(tokens, probs, routing_map)
        out = self.dispatcher.combine(self.experts(expert_input, counts))
        self.tokens_per_expert = routing_map.sum(0).detach()
        self.local_tokens_per_expert = counts.detach()
        return out.view_as(x)


def expert_parallel_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` tagged as expert parameters (reduce their gradients over ``edp``)."""
    return (p for p in module.parameters() if is_expert_parallel(p))
