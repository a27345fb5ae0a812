"""``AllGatherDispatcher``: every rank sees every token of the EP x ETP group and picks its experts' rows.

Dispatch all-gathers ``hidden``, ``probs`` and the routing map over ETP and then EP; each rank takes the
rows routed to its local experts. Combine scatters the weighted expert outputs back to token positions
and reduce-scatters over EP and then ETP, which also completes the row-parallel partial sums of ETP
experts. Every rank of the group must hold the same number of tokens. Simple, and cheap for small EP.
"""

from __future__ import annotations

import torch

from . import comm
from .dispatch_base import Dispatcher, permute, weighted_scatter


class AllGatherDispatcher(Dispatcher):
    """Token dispatch by all-gather and reduce-scatter over the expert-parallel (and ETP) group."""

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(hidden, probs, routing_map)
        hidden_all = comm.all_gather(comm.all_gather(hidden, self.etp_group), self.ep_group)
        probs_all = comm.all_gather(comm.all_gather(probs, self.etp_group), self.ep_group)
        map_all = routing_map.to(torch.uint8)
        map_all = comm.all_gather_plain(comm.all_gather_plain(map_all, self.etp_group), self.ep_group).bool()
        local = map_all[:, self.first_expert : self.first_expert + self.num_local_experts]
        token_index, expert_index = permute(local)
        self._token_index, self._tokens = token_index, hidden_all.size(0)
        self._weights = probs_all[token_index, expert_index + self.first_expert]
        return hidden_all.index_select(0, token_index), local.sum(0)

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        out = weighted_scatter(expert_output, self._token_index, self._weights, self._tokens)
        return comm.reduce_scatter(comm.reduce_scatter(out, self.ep_group), self.etp_group)
