"""``TopKRouter``: scores every token against every expert and keeps the top ``k`` of them.

The router returns ``probs`` (``[tokens, experts]``, zero where an expert was not chosen) and a bool
``routing_map`` of the same shape. Its auxiliary losses (load balancing and z-loss) backpropagate
through :func:`moe_dispatch.aux_loss.attach_loss`; their last values are in ``router.aux_losses``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pstate
from tp_layers import init as tp_init

from .aux_loss import attach_loss, sequence_aux_losses
from .capacity import drop_over_capacity, expert_capacity, pad_to_capacity
from .errors import MoEError
from .topk import topk_index

SCORES = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


class TopKRouter(nn.Module):
    """Top-k gating over ``num_experts`` experts for inputs ``[tokens, hidden]``.

    - ``score="softmax"``: with ``pre_softmax=False`` (default) the top ``k`` logits are chosen and
      softmaxed among themselves (they sum to one); with ``pre_softmax=True`` the softmax over all
      experts is taken first and the top ``k`` probabilities are kept as they are.
    - ``score="sigmoid"``: sigmoid scores; the top ``k`` are renormalised to sum to one when ``k > 1``.
    - ``num_groups``, ``topk_groups``: group-limited top-k (see :mod:`moe_dispatch.topk`): the experts
      form ``num_groups`` groups of consecutive experts and each token picks its experts inside its
      ``topk_groups`` best groups only. Default: no limit.
    - ``aux_loss_coeff``: Switch load-balancing loss (see :func:`~moe_dispatch.aux_loss.load_balancing_loss`),
      computed on this call's tokens (one rank's batch under expert parallelism) from the routing map
      before capacity dropping. ``z_loss_coeff``: router z-loss. Both backpropagate with weight
      ``aux_loss_scale`` (set it to your loss scaling, e.g. ``1/microbatches``) without being added to
      the caller's loss; their last values are in ``aux_losses``. ``aux_loss_group``: the ranks that
      hold other tokens of the same sequences (TP under sequence parallelism, CP): both losses are then
      taken over all their tokens, as one process would on whole sequences (each rank backpropagates its
      share; one small all-reduce per call), and ``aux_losses`` hold the whole losses.
    - ``capacity_factor``: each expert takes at most :func:`expert_capacity` tokens of this call; the
      rest are dropped by ``drop_policy`` (``"probs"``: lowest probability first; ``"position"``: latest
      tokens first). ``None`` (default) is dropless. ``pad_to_capacity=True`` then fills every expert
      up to exactly the capacity (at most the number of tokens) with unrouted tokens of probability
      zero: ``routing_map`` marks them, ``probs`` is zero there, and they change no output or gradient.
    - ``scaling_factor``: multiplies the chosen experts' probabilities (DeepSeek-V3's
      ``routed_scaling_factor``), after any renormalisation.
    - ``expert_bias``: aux-loss-free balancing; a per-expert bias (a buffer, not trained by the optimizer)
      is added to the scores for the choice of experts only, and :meth:`update_expert_bias` moves it.

    After each forward, ``tokens_per_expert`` holds the tokens routed to each expert (after dropping,
    padding not counted) and ``aux_losses`` the auxiliary loss values, for logging.

    The weight is ``[num_experts, hidden]``, drawn like ``nn.Linear``'s (no bias) from ``seed`` or the
    default generator; it is replicated on every rank (its gradient is reduced over data parallel).
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        topk: int,
        *,
        score: str = "softmax",
        pre_softmax: bool = False,
        num_groups: int = 1,
        topk_groups: int | None = None,
        aux_loss_coeff: float = 0.0,
        z_loss_coeff: float = 0.0,
        aux_loss_scale: float = 1.0,
        aux_loss_group: pstate.Group | None = None,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        pad_to_capacity: bool = False,
        expert_bias: bool = False,
        scaling_factor: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_router_args(
            num_experts,
            topk,
            score=score,
            pre_softmax=pre_softmax,
            num_groups=num_groups,
            topk_groups=topk_groups,
            capacity_factor=capacity_factor,
            drop_policy=drop_policy,
            pad_to_capacity=pad_to_capacity,
        )
        if not scaling_factor > 0:
            raise MoEError(f"scaling_factor={scaling_factor}: must be > 0")
        if aux_loss_coeff < 0 or z_loss_coeff < 0:
            raise MoEError(f"aux_loss_coeff={aux_loss_coeff}, z_loss_coeff={z_loss_coeff}: must be >= 0")
        self.hidden, self.num_experts, self.topk = hidden, num_experts, topk
        self.score, self.pre_softmax = score, pre_softmax
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.aux_loss_coeff, self.z_loss_coeff, self.aux_loss_scale = aux_loss_coeff, z_loss_coeff, aux_loss_scale
        self.aux_loss_group = None if aux_loss_group is None else pstate.as_group(aux_loss_group)
        self.capacity_factor, self.drop_policy, self.pad_to_capacity = capacity_factor, drop_policy, pad_to_capacity
        self.scaling_factor = scaling_factor
        weight = tp_init.draw((num_experts, hidden), tp_init.linear_init, tp_init.generator_for(seed))
        self.weight = nn.Parameter(weight.to(dtype=dtype or torch.get_default_dtype(), device=device))
        self.register_buffer(
            "expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32) if expert_bias else None
        )
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, routing_map)`` for ``x`` of shape ``[tokens, hidden]``."""
        if x.dim() != 2 or x.size(1) != self.hidden:
            raise MoEError(f"TopKRouter: input has shape {tuple(x.shape)}, expected [tokens, {self.hidden}]")
        logits = F.linear(x, self.weight)
        attach = torch.is_grad_enabled() and logits.requires_grad
        probs, routing_map, scores = self._route(logits)
        self.aux_losses = {}
        if self.aux_loss_coeff > 0 or self.z_loss_coeff > 0:
            losses = sequence_aux_losses(
                logits, scores, routing_map, self.topk, aux_loss_coeff=self.aux_loss_coeff,
                z_loss_coeff=self.z_loss_coeff, group=self.aux_loss_group,
            )  # fmt: skip
            for name, (share, whole) in losses.items():
                self.aux_losses[name] = whole.detach()
                if attach:
                    probs = attach_loss(probs, share, self.aux_loss_scale)
        if self.capacity_factor is not None:
            capacity = expert_capacity(x.size(0), self.num_experts, self.topk, self.capacity_factor)
            probs, routing_map = drop_over_capacity(probs, routing_map, capacity, self.drop_policy)
        self.tokens_per_expert = routing_map.sum(0)
        if self.pad_to_capacity:  # validated: only with a capacity factor
            routing_map = pad_to_capacity(routing_map, capacity)
        return probs, routing_map

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k probs, the map, and the full per-token score distribution used by the aux loss."""
        groups = {"num_groups": self.num_groups, "topk_groups": self.topk_groups}
        choose = {"bias": self.expert_bias, "k": self.topk, **groups}
        if self.score == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
            index = topk_index(scores if self.pre_softmax else logits, **choose)
            picked = scores.gather(1, index) if self.pre_softmax else torch.softmax(logits.gather(1, index), -1)
        else:
            sig = torch.sigmoid(logits)
            index = topk_index(sig, **choose)
            picked = sig.gather(1, index)
            if self.topk > 1:
                picked = picked / (picked.sum(-1, keepdim=True) + 1e-20)
            scores = sig / (sig.sum(-1, keepdim=True) + 1e-20)
        if self.scaling_factor != 1.0:
            picked = picked * self.scaling_factor
        probs = torch.zeros_like(logits).scatter(1, index, picked)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
        return probs, routing_map, scores

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts and lower that of over-loaded
        ones by ``rate`` (``bias += rate * sign(mean_load - load)``). Pass the counts summed over the
        data-parallel ranks so that every rank makes the same update."""
        if self.expert_bias is None:
            raise MoEError("update_expert_bias: the router was built with expert_bias=False")
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(load.mean() - load)

    def extra_repr(self) -> str:
        groups = f", num_groups={self.num_groups}, topk_groups={self.topk_groups}" if self.num_groups > 1 else ""
        return f"hidden={self.hidden}, num_experts={self.num_experts}, topk={self.topk}, score={self.score}{groups}"


def check_router_args(
    num_experts: int,
    topk: int,
    *,
    score: str = "softmax",
    pre_softmax: bool = False,
    num_groups: int = 1,
    topk_groups: int | None = None,
    capacity_factor: float | None = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> None:
    """Raise :class:`MoEError` for a router configuration that cannot work."""
    if num_experts < 1:
        raise MoEError(f"num_experts={num_experts}: must be at least 1")
    if not 1 <= topk <= num_experts:
        raise MoEError(f"topk={topk}: must be between 1 and num_experts={num_experts}")
    if score not in SCORES:
        raise MoEError(f"score={score!r}: must be one of {SCORES}")
    if pre_softmax and score != "softmax":
        raise MoEError(f"pre_softmax=True: only applies to score='softmax', not score={score!r}")
    if num_groups < 1 or num_experts % num_groups:
        raise MoEError(f"num_groups={num_groups}: must be a positive divisor of num_experts={num_experts}")
    if topk_groups is not None:
        if not 1 <= topk_groups <= num_groups:
            raise MoEError(f"topk_groups={topk_groups}: must be between 1 and num_groups={num_groups}")
        if topk > topk_groups * (num_experts // num_groups):
            raise MoEError(
                f"topk={topk}: more than the {topk_groups * (num_experts // num_groups)} experts in "
                f"topk_groups={topk_groups} groups of {num_experts // num_groups}"
            )
    if capacity_factor is not None and capacity_factor <= 0:
        raise MoEError(f"capacity_factor={capacity_factor}: must be positive (or None for dropless)")
    if drop_policy not in DROP_POLICIES:
        raise MoEError(f"drop_policy={drop_policy!r}: must be one of {DROP_POLICIES}")
    if pad_to_capacity and capacity_factor is None:
        raise MoEError("pad_to_capacity=True: needs a capacity_factor (dropless routing has no capacity)")
