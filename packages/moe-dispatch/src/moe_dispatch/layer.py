"""``MoELayer``: router, dispatcher, experts and an optional shared expert; a drop-in for a dense MLP.

Activations are ``[seq, batch, hidden]`` in and out.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from pstate.tags import is_expert_parallel, mark_sequence_parallel

from .comm import GroupOrNone, size_of
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoall import AllToAllDispatcher
from .dispatch_flex import FlexDispatcher
from .errors import MoEError
from .experts import GroupedExperts
from .overlap import Stage
from .router import TopKRouter
from .shared_expert import SharedExpert
from .staged_layer import moe_pieces

DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher, "flex": FlexDispatcher}
ROUTER_OPTIONS = frozenset(inspect.signature(TopKRouter).parameters) - {
    "hidden",
    "num_experts",
    "topk",
    "seed",
    "dtype",
    "device",
}


class MoELayer(nn.Module):
    """Mixture of ``num_experts`` MLP experts with top-``topk`` routing, experts spread over ``ep_group``
    (EP rank ``r`` holds experts ``r*E/ep`` to ``(r+1)*E/ep - 1``) and each split over ``etp_group``.

    The router is replicated (its gradient is reduced over the dense data-parallel group). The expert
    weights are tagged ``expert_parallel = True`` (see :func:`expert_parallel_params`): reduce their
    gradients over the ``edp`` group instead. Each rank routes its own tokens, so the router's auxiliary
    losses and any capacity are per rank's batch. After each forward, ``tokens_per_expert`` holds this
    rank's token count per global expert (after dropping, padding not counted) and
    ``local_tokens_per_expert`` the rows each local expert processed (padding included). Router options
    (``score``, ``num_groups``, ``topk_groups``, ``aux_loss_coeff``, ``capacity_factor``,
    ``pad_to_capacity``, ...) are passed to :class:`TopKRouter`; ``gemm`` to :class:`GroupedExperts`.
    ``draw_experts=False``: the experts and the shared expert start at zero, holding only this rank's
    slices, for a caller that draws (block by block) or loads their values itself.

    ``shared_ffn_hidden``: add a :class:`SharedExpert` of that width, which every token goes through
    (``shared_gate=True``: scaled by a per-token sigmoid gate), TP-split over ``tp_group`` when one is
    given. ``sequence_parallel=True`` says the input is this rank's sequence shard of the ``tp_group``:
    the shared expert gathers it, and the router and gate weights are tagged sequence parallel (their
    gradients are partial sums over TP, to be all-reduced like the other sequence-parallel weights).
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
        gemm: str = "auto",
        shared_ffn_hidden: int | None = None,
        shared_gate: bool = False,
        tp_group: GroupOrNone = None,
        sequence_parallel: bool = False,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        draw_experts: bool = True,
        **router_options,
    ) -> None:
        super().__init__()
        if dispatcher not in DISPATCHERS:
            raise MoEError(f"dispatcher={dispatcher!r}: must be one of {tuple(DISPATCHERS)}")
        unknown = sorted(set(router_options) - ROUTER_OPTIONS)
        if unknown:
            raise MoEError(f"MoELayer: unknown option(s) {unknown}; router options are {sorted(ROUTER_OPTIONS)}")
        etp = size_of(etp_group)
        if ffn_hidden % etp:
            raise MoEError(f"ffn_hidden={ffn_hidden}: must be divisible by the expert-tensor-parallel size {etp}")
        if shared_ffn_hidden is None and (shared_gate or tp_group is not None):
            raise MoEError("shared_gate / tp_group: only used by a shared expert; set shared_ffn_hidden")
        self.hidden = hidden
        self.router = TopKRouter(hidden, num_experts, topk, seed=seed, dtype=dtype, device=device, **router_options)
        self.dispatcher = DISPATCHERS[dispatcher](num_experts, ep_group=ep_group, etp_group=etp_group)
        self.experts = GroupedExperts(
            self.dispatcher.num_local_experts,
            hidden,
            ffn_hidden,
            activation=activation,
            etp_group=etp_group,
            first_expert=self.dispatcher.first_expert,
            gemm=gemm,
            seed=None if seed is None else seed + 1,
            dtype=dtype,
            device=device,
            draw=draw_experts,
        )
        self.shared_expert = None
        if shared_ffn_hidden is not None:
            self.shared_expert = SharedExpert(
                hidden,
                shared_ffn_hidden,
                activation=activation,
                gate=shared_gate,
                tp_group=tp_group,
                sequence_parallel=sequence_parallel,
                seed=None if seed is None else seed + 2,
                dtype=dtype,
                device=device,
                draw=draw_experts,
            )
        if sequence_parallel:
            mark_sequence_parallel(self.router.weight)
        self.tokens_per_expert: torch.Tensor | None = None
        self.local_tokens_per_expert: torch.Tensor | None = None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`MoEError` unless ``x`` is ``[seq, batch, hidden]``."""
        if x.dim() != 3 or x.size(-1) != self.hidden:
            raise MoEError(f"MoELayer: input has shape {tuple(x.shape)}, expected [seq, batch, {self.hidden}]")

    def stages(self) -> list[Stage]:
        """This layer cut at its two EP all-to-alls for one microbatch, ``(*carry, x) -> (*carry, layer(x))``
        (see :mod:`moe_dispatch.staged_layer`; all-to-all dispatcher only): run them with
        :class:`moe_dispatch.overlap.StagedRun` to overlap the all-to-alls with another microbatch."""
        return moe_pieces(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[seq, batch, hidden]`` in, the same shape out."""
        self.check_input(x)
        tokens = x.reshape(-1, x.size(-1))
        probs, routing_map = self.router(tokens)
        expert_input, counts = self.dispatcher.dispatch(tokens, probs, routing_map)
        out = self.dispatcher.combine(self.experts(expert_input, counts)).view_as(x)
        self.tokens_per_expert = self.router.tokens_per_expert
        self.local_tokens_per_expert = counts.detach()
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out


def expert_parallel_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` tagged as expert parameters (reduce their gradients over ``edp``)."""
    return (p for p in module.parameters() if is_expert_parallel(p))
