"""``MoELayer`` cut into pieces for :mod:`moe_dispatch.overlap`: route, dispatch, experts, combine, finish.

The pieces act on the last value of the tuple they get and pass the others through, so a caller can
carry its own tensors (a residual stream) around the layer: ``(*carry, x) -> (*carry, moe(x))``.

- route (compute): router, shared expert, count exchange, the rows to send ordered by EP rank;
- dispatch (exchange): the rows to the ranks holding their experts;
- experts (compute): gather over ETP, sort by local expert, the experts, unsort, reduce-scatter over ETP;
- combine (exchange): the output rows back;
- finish (compute): each token's probability-weighted sum of its rows, plus the shared expert.

The count exchange stays in the route piece (a small synchronous all-gather: the all-to-all's row
counts must be known before it starts), and ETP's gather and reduce-scatter stay in the experts piece;
only the EP all-to-alls, which carry the tokens, run asynchronously.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dispatch_alltoall import AllToAllDispatcher, Routing
from .errors import MoEError
from .overlap import Compute, Exchange, Stage, Tensors

if TYPE_CHECKING:
    from .layer import MoELayer


def moe_pieces(layer: MoELayer) -> list[Stage]:
    """Fresh pieces of ``layer`` for one microbatch (they keep that microbatch's routing)."""
    d = layer.dispatcher
    if not isinstance(d, AllToAllDispatcher):
        raise MoEError(f"MoE overlap needs dispatcher='alltoall', not {type(d).__name__}")
    state: dict[str, object] = {}
    shared = layer.shared_expert is not None

    def routing() -> Routing:
        return state["routing"]  # type: ignore[return-value]

    def route(values: Tensors) -> Tensors:
        *carry, x = values
        layer.check_input(x)
        tokens = x.reshape(-1, x.size(-1))
        probs, routing_map = layer.router(tokens)
        r, rows, weights = d.prepare(tokens, probs, routing_map)
        state["routing"], state["shape"] = r, x.shape
        layer.tokens_per_expert = layer.router.tokens_per_expert
        layer.local_tokens_per_expert = r.local_counts.detach()
        extra = (layer.shared_expert(x),) if shared else ()
        return (*carry, weights, *extra, rows)

    def experts(values: Tensors) -> Tensors:
        *carry, rows = values
        expert_input, counts = d.arrive(routing(), rows)
        return (*carry, d.depart(routing(), layer.experts(expert_input, counts)))

    def finish(values: Tensors) -> Tensors:
        if shared:
            *carry, weights, shared_out, rows = values
        else:
            *carry, weights, rows = values
        out = d.finish(routing(), rows, weights).view(state["shape"])  # type: ignore[arg-type]
        return (*carry, out + shared_out if shared else out)

    return [
        Compute(route, "route"),
        Exchange(lambda: (routing().recv, routing().send), d.ep_group, "dispatch"),
        Compute(experts, "experts"),
        Exchange(lambda: (routing().send, routing().recv), d.ep_group, "combine"),
        Compute(finish, "finish"),
    ]
