"""``FlexDispatcher``: the all-to-all dispatch on DeepEP's fused NVLink/RDMA kernels (``deep_ep.Buffer``).

The same interface as :class:`AllToAllDispatcher`. Dispatch: turn the routing map into DeepEP's
``topk_idx`` / ``topk_weights`` (``-1`` where a token has fewer experts), let ``Buffer.dispatch`` send
each token once to every EP rank that holds one of its experts (DeepEP gives each received token's
experts as local indices, ``-1`` for other ranks' experts), then sort the received rows by local expert
here. Combine: the probability-weighted sum per received token here, then ``Buffer.combine`` sums the
ranks' parts into each token's row. Backward runs the opposite kernel (dispatch's backward is a
combine of the gradients, also of the weights; combine's is a dispatch with the same handle).

DeepEP moves bf16 rows: the hidden states are cast to bf16 on the way and back to their dtype after.
Needs ``etp=1``, CUDA and the ``deep_ep`` package, imported when a dispatcher is made. Written against
DeepEP's ``Buffer`` API (``get_dispatch_layout``, ``dispatch``, ``combine``, the configs' buffer size
hints); not run here (no GPU): the GPU validation script is its test.
"""

from __future__ import annotations

from typing import Any

import torch

from pstate import as_group

from .comm import GroupOrNone
from .dispatch_base import Dispatcher, permute, weighted_scatter
from .errors import MoEError


def _deep_ep() -> Any:
    try:
        import deep_ep
    except ImportError:
        raise MoEError("dispatcher='flex' needs the deep_ep package (DeepEP), which is not installed") from None
    return deep_ep


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer, state):
        layout = buffer.get_dispatch_layout(topk_idx, state["num_experts"])
        per_rank, per_rdma_rank, per_expert, in_rank, _ = layout
        recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        )  # fmt: skip
        state["handle"], state["counts"] = handle, counts
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_weights

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_weights):
        weights = None if grad_weights is None else grad_weights.float().contiguous()
        grad, grad_topk, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=weights)
        return grad, grad_topk, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        out, _, _ = buffer.combine(x, handle)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, *_ = ctx.buffer.dispatch(grad_out.contiguous(), handle=ctx.handle)
        return grad, None, None


class FlexDispatcher(Dispatcher):
    """Token dispatch by DeepEP's fused kernels over the expert-parallel group (``etp`` must be 1)."""

    def __init__(self, num_experts: int, *, ep_group: GroupOrNone, etp_group: GroupOrNone = None) -> None:
        super().__init__(num_experts, ep_group=ep_group, etp_group=etp_group)
        self._lib = _deep_ep()
        if self.etp != 1:
            raise MoEError(f"dispatcher='flex': needs etp=1 (DeepEP moves whole tokens), got etp={self.etp}")
        if ep_group is None:
            raise MoEError("dispatcher='flex': needs an expert-parallel process group (ep_group)")
        self._group = as_group(ep_group)
        self._buffer, self._buffer_bytes = None, 0

    def _buffer_for(self, hidden_bytes: int) -> Any:
        """DeepEP's communication buffer, sized by its own hints for ``hidden_bytes`` per token (kept and
        grown when a wider row comes)."""
        if self._buffer is None or hidden_bytes > self._buffer_bytes:
            Buffer, ranks = self._lib.Buffer, self._group.size()
            configs = (Buffer.get_dispatch_config(ranks), Buffer.get_combine_config(ranks))
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, ranks) for c in configs)
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, ranks) for c in configs) if ranks > 8 else 0
            self._buffer, self._buffer_bytes = Buffer(self._group, nvl, rdma), hidden_bytes
        return self._buffer

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(hidden, probs, routing_map)
        k = max(int(routing_map.sum(1).max()), 1)
        order = torch.sort(routing_map.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        chosen = routing_map.gather(1, order)
        topk_idx = torch.where(chosen, order, -1).to(getattr(self._lib, "topk_idx_t", torch.int64))
        topk_weights = torch.where(chosen, probs.gather(1, order), 0).float()
        self._dtype = hidden.dtype
        x = hidden.to(torch.bfloat16).contiguous()
        buffer = self._buffer_for(x.size(1) * x.element_size())
        state: dict[str, Any] = {"num_experts": self.num_experts}
        recv_x, recv_idx, recv_weights = _Dispatch.apply(x, topk_weights, topk_idx, buffer, state)
        self._handle, self._rows = state["handle"], recv_x.size(0)
        slot_token, slot = (recv_idx >= 0).nonzero(as_tuple=True)
        local = recv_idx[slot_token, slot].long()
        local_map = torch.zeros(self._rows, self.num_local_experts, dtype=torch.bool, device=recv_x.device)
        local_map[slot_token, local] = True
        weights = recv_weights.new_zeros(self._rows, self.num_local_experts).index_put(
            (slot_token, local), recv_weights[slot_token, slot]
        )
        self._token_index, expert_index = permute(local_map)
        self._weights = weights[self._token_index, expert_index]
        return recv_x.index_select(0, self._token_index), local_map.sum(0)

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        rows = weighted_scatter(expert_output, self._token_index, self._weights, self._rows)
        return _Combine.apply(rows.to(torch.bfloat16).contiguous(), self._buffer, self._handle).to(self._dtype)
