"""``AllToAllDispatcher``: each token row travels only to the EP rank that holds its expert.

Dispatch: permute this rank's (token, expert) pairs by expert (so by destination rank), exchange the
per-expert counts (one small all-gather over EP and one over ETP), all-to-all the rows over EP with
uneven splits, all-gather the received rows over ETP (uneven), and sort them by local expert. Combine
is the exact reverse: unsort, reduce-scatter over ETP (which also sums the row-parallel partial
outputs of ETP experts), all-to-all back, and the probability-weighted sum into token positions.

Each direction is split at its EP all-to-all (``prepare`` / ``arrive``, ``depart`` / ``finish``), with
what a call needs kept in one :class:`Routing` per call, so that :mod:`moe_dispatch.overlap` can run the
all-to-all asynchronously while another microbatch, with its own ``Routing``, computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .dispatch_base import Dispatcher, permute, weighted_scatter


@dataclass
class Routing:
    """One call's routing: row counts of the EP all-to-all (``recv[j]`` rows from and ``send[j]`` rows to
    EP rank ``j``), of the ETP gather, the sort by local expert, and where each sent row's token is."""

    send: list[int]
    recv: list[int]
    etp_rows: list[int]
    sort: list[list[int]]
    local_counts: torch.Tensor
    token_index: torch.Tensor
    tokens: int


class AllToAllDispatcher(Dispatcher):
    """Token dispatch by all-to-all over the expert-parallel group (and all-gather over ETP).

    ``routing`` is the last :meth:`dispatch`'s :class:`Routing` (what its :meth:`combine` uses)."""

    routing: Routing | None = None

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.routing, rows, self._weights = self.prepare(hidden, probs, routing_map)
        r = self.routing
        return self.arrive(r, comm.all_to_all(rows, r.recv, r.send, self.ep_group))

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        r = self.routing
        rows = self.depart(r, expert_output)
        return self.finish(r, comm.all_to_all(rows, r.send, r.recv, self.ep_group), self._weights)

    # -- the halves around the EP all-to-all --

    def prepare(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """Exchange the counts; return the call's :class:`Routing`, the rows to send over EP (ordered by
        destination rank) and each row's routing weight (its probability)."""
        self.check_inputs(hidden, probs, routing_map)
        token_index, expert_index = permute(routing_map)
        counts = routing_map.sum(0)
        every = comm.gather_counts(comm.gather_counts(counts, self.ep_group), self.etp_group)  # [etp, ep, E]
        first, local = self.first_expert, self.num_local_experts
        mine = every[:, :, first : first + local]  # [etp, ep, local]: rows for my experts from each rank
        routing = Routing(
            send=counts.view(self.ep, local).sum(1).tolist(),
            recv=mine[comm.rank_in(self.etp_group)].sum(-1).tolist(),
            etp_rows=mine.sum((1, 2)).tolist(),
            sort=mine.reshape(self.etp * self.ep, local).tolist(),
            local_counts=mine.sum((0, 1)),
            token_index=token_index,
            tokens=hidden.size(0),
        )
        return routing, hidden.index_select(0, token_index), probs[token_index, expert_index]

    def arrive(self, routing: Routing, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows received over EP, gathered over ETP and sorted by local expert; the rows per local expert."""
        rows = comm.gather_uneven(rows, routing.etp_rows, self.etp_group)
        return comm.regroup(rows, routing.sort), routing.local_counts

    def depart(self, routing: Routing, expert_output: torch.Tensor) -> torch.Tensor:
        """The experts' output rows unsorted and reduce-scattered over ETP: what goes back over EP."""
        rows = comm.regroup(expert_output, comm.transpose(routing.sort))
        return comm.reduce_scatter_uneven(rows, routing.etp_rows, self.etp_group)

    def finish(self, routing: Routing, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's ``weights``-weighted sum of its rows returned over EP."""
        return weighted_scatter(rows, routing.token_index, weights, routing.tokens)
