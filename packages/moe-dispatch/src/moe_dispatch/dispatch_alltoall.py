"""``AllToAllDispatcher``: each token row travels only to the EP rank that holds its expert.

Dispatch: permute this rank's (token, expert) pairs by expert (so by destination rank), exchange the
per-expert counts (one small all-gather over EP and one over ETP), all-to-all the rows over EP with
uneven splits, all-gather the received rows over ETP (uneven), and sort them by local expert. Combine
is the exact reverse: unsort, reduce-scatter over ETP (which also sums the row-parallel partial
outputs of ETP experts), all-to-all back, and the probability-weighted sum into token positions.
"""

from __future__ import annotations

import torch

from . import comm
from .dispatch_base import Dispatcher, permute, weighted_scatter


class AllToAllDispatcher(Dispatcher):
    """Token dispatch by all-to-all over the expert-parallel group (and all-gather over ETP)."""

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(hidden, probs, routing_map)
        token_index, expert_index = permute(routing_map)
        counts = routing_map.sum(0)
        every = comm.gather_counts(comm.gather_counts(counts, self.ep_group), self.etp_group)  # [etp, ep, E]
        first, local = self.first_expert, self.num_local_experts
        mine = every[:, :, first : first + local]  # [etp, ep, local]: rows for my experts from each rank
        etp_rank = comm.rank_in(self.etp_group)
        self._send = counts.view(self.ep, local).sum(1).tolist()
        self._recv = mine[etp_rank].sum(-1).tolist()
        self._etp_rows = mine.sum((1, 2)).tolist()
        self._sort = mine.reshape(self.etp * self.ep, local).tolist()
        self._token_index, self._tokens = token_index, hidden.size(0)
        self._weights = probs[token_index, expert_index]
        rows = hidden.index_select(0, token_index)
        rows = comm.all_to_all(rows, self._recv, self._send, self.ep_group)
        rows = comm.gather_uneven(rows, self._etp_rows, self.etp_group)
        return comm.regroup(rows, self._sort), mine.sum((0, 1))

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        rows = comm.regroup(expert_output, comm.transpose(self._sort))
        rows = comm.reduce_scatter_uneven(rows, self._etp_rows, self.etp_group)
        rows = comm.all_to_all(rows, self._send, self._recv, self.ep_group)
        return weighted_scatter(rows, self._token_index, self._weights, self._tokens)
