"""A backward split in two: ``I`` computes only the stage input's gradient, ``W`` later the weights'.

The autograd graph of a stage has a main path (from the outputs down to the inputs) and, hanging off
it, small weight subgraphs (a weight, its ``AccumulateGrad`` node and any view or cast of it, such as
the transpose a ``Linear`` takes). A *join* is a main-path node with an edge into a weight subgraph
(``AddmmBackward`` of a ``Linear``). ``I`` runs autograd from the outputs to the stage inputs and to
the joins' gradient edges: it computes the input gradient and *captures* the gradient flowing into
each join, without computing any weight gradient (autograd only evaluates a node's outputs that lead
to a requested input). ``W`` then runs autograd from the joins, with the captured gradients, to the
weights: only the joins and the weight subgraphs run, and ``.grad`` is accumulated as in a full
backward (post-accumulate hooks fire, so data-parallel wrappers see it).

Memory: :class:`SavedTensors` records every tensor autograd saves during the forward. After ``I`` it
keeps only those the nodes ``W`` will run have saved (typically each layer's input), so what a
microbatch holds from ``I`` to ``W`` is what ``W`` needs, not the whole forward's activations.

The idea is ``torch.distributed.pipelining``'s ``stage_backward_input`` / ``stage_backward_weight``;
capturing at gradient edges (instead of node pre-hooks) also splits a stage whose input needs no
gradient (the first stage), and the joins are grouped so that no ``W`` call walks the main path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge, saved_tensors_hooks

from .errors import PipelineScheduleError


class _Slot:
    """One tensor autograd saved: dropped (``tensor = None``) when ``W`` does not need it."""

    __slots__ = ("tensor", "used")

    def __init__(self, tensor: torch.Tensor):
        self.tensor: torch.Tensor | None = tensor
        self.used = False


class SavedTensors:
    """Records what autograd saves while :meth:`recording` is entered, so it can be dropped selectively."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = []

    def recording(self) -> saved_tensors_hooks:
        """A context manager for the forward (and loss) whose saved tensors this object holds."""
        return saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Slot:
        slot = _Slot(tensor)
        self._slots.append(slot)
        return slot

    @staticmethod
    def _unpack(slot: _Slot) -> torch.Tensor:
        if slot.tensor is None:
            raise PipelineScheduleError(
                "the weight-gradient pass needed a tensor that was dropped after the input-gradient pass; "
                "a node of the weight subgraph does not expose what it saved (as '_saved_*' attributes)"
            )
        slot.used = True
        return slot.tensor

    def keep_only(self, nodes: Iterable[Node]) -> None:
        """Drop every saved tensor except those ``nodes`` saved (found by reading their ``_saved_*``)."""
        for slot in self._slots:
            slot.used = False
        for node in nodes:
            for name in dir(node):
                if name.startswith("_saved_") or name == "saved_tensors":
                    getattr(node, name)  # unpacks, which marks the slot used
        for slot in self._slots:
            if not slot.used:
                slot.tensor = None
        self._slots = [slot for slot in self._slots if slot.used]

    def tensors(self) -> list[torch.Tensor]:
        """The saved tensors still held (parameters and views of them included)."""
        return [slot.tensor for slot in self._slots if slot.tensor is not None]


@dataclass
class _Group:
    """Joins that share weights, the weights, and the nodes the weight-gradient pass runs for them."""

    joins: list[Node] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    nodes: set[Node] = field(default_factory=set)
    leaves: list[Node] = field(default_factory=list)  # the weights' AccumulateGrad nodes
    grads: list[tuple[torch.Tensor | None, ...]] = field(default_factory=list)  # captured, per join


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _graph(roots: Sequence[Node]) -> list[Node]:
    """Every node reachable from ``roots``, children before parents (iterative post-order)."""
    order: list[Node] = []
    seen: set[Node] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(_children(root)))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                order.append(node)
            elif child not in seen:
                seen.add(child)
                stack.append((child, iter(_children(child))))
    return order


def _groups(roots: set[Node], input_nodes: set[Node]) -> list[_Group]:
    """The weight-gradient groups of the graph below ``roots`` (see the module docstring)."""
    order = _graph(list(roots))
    weight_only: dict[Node, bool] = {}  # a weight leaf, or a node all of whose children are weight-only
    for node in order:
        children = _children(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            weight_only[node] = node not in input_nodes
        else:
            weight_only[node] = bool(children) and all(weight_only[c] for c in children)
    found: list[_Group] = []  # one per join, merged below when joins share a weight
    for node in order:
        # a join: a main-path node with an edge into a weight subgraph (or an output that is all weights)
        starts = [node] if weight_only[node] and node in roots else [c for c in _children(node) if weight_only[c]]
        if not starts or (weight_only[node] and node not in roots):
            continue
        group = _Group(joins=[node], nodes={node})
        stack = list(starts)
        while stack:
            sub = stack.pop()
            group.nodes.add(sub)
            stack += [c for c in _children(sub) if c not in group.nodes]
            if hasattr(sub, "variable"):
                group.leaves.append(sub)
        found.append(group)
    parent = list(range(len(found)))  # union-find: joins that share a weight form one group

    def top(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Node, int] = {}
    for i, group in enumerate(found):
        for leaf in group.leaves:
            parent[top(i)] = top(first.setdefault(leaf, i))
    merged: dict[int, _Group] = {}
    for i, group in enumerate(found):
        into = merged.setdefault(top(i), _Group())
        into.joins += group.joins
        into.nodes |= group.nodes
        into.leaves += group.leaves
    groups = list(merged.values())
    for group in groups:
        group.weights = [leaf.variable for leaf in dict.fromkeys(group.leaves)]
        if len(group.joins) > 1:
            group.nodes |= _between(order, group.joins)
    return groups


def _between(order: list[Node], joins: list[Node]) -> set[Node]:
    """Nodes on paths from one join to another (the weight pass of a group with several joins runs them)."""
    targets = set(joins)
    reaches: set[Node] = set()
    for node in order:  # children first, so a node's children are decided before it
        if node in targets or any(c in reaches for c in _children(node)):
            reaches.add(node)
    below: set[Node] = set()
    stack = [c for j in joins for c in _children(j)]
    while stack:
        node = stack.pop()
        if node in reaches and node not in below:
            below.add(node)
            stack += _children(node)
    return below


class WeightGradient:
    """What the weight-gradient pass of one microbatch needs; :meth:`run` accumulates it into ``.grad``."""

    def __init__(self, groups: list[_Group], saved: SavedTensors | None):
        self._groups = groups
        self._saved = saved

    def run(self) -> None:
        """Accumulate the weight gradients into ``.grad`` and drop everything held for them."""
        # a group with several joins runs the main path between them, which may hold other groups' joins
        retain = any(len(group.joins) > 1 for group in self._groups)
        for group in self._groups:
            edges, grads = [], []
            for join, captured in zip(group.joins, group.grads):
                for i, grad in enumerate(captured):
                    if grad is not None:
                        edges.append(GradientEdge(join, i))
                        grads.append(grad)
            if not edges or not group.weights:
                continue
            # several joins of one group may lie on one path: the pass would add the upstream join's
            # contribution to the downstream one's already complete captured gradient, so replace it
            handles = []
            if len(group.joins) > 1:
                for join, captured in zip(group.joins, group.grads):
                    handles.append(join.register_prehook(lambda _grads, captured=captured: captured))
            try:
                torch.autograd.backward(edges, grads, inputs=group.weights, retain_graph=retain)
            finally:
                for handle in handles:
                    handle.remove()
        self._groups, self._saved = [], None


def input_backward(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    saved: SavedTensors | None = None,
) -> tuple[tuple[torch.Tensor | None, ...], WeightGradient]:
    """The input-gradient pass: the gradients of ``outputs`` (with ``grads``; ``None`` for a scalar loss)
    with respect to ``inputs`` (leaves), and the :class:`WeightGradient` that computes the rest later.

    No ``.grad`` is touched. When ``saved`` recorded the forward, only what the weight pass needs stays held.
    """
    roots = {get_gradient_edge(o).node for o in outputs}
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    groups = _groups(roots, input_nodes)
    edges = [GradientEdge(j, i) for g in groups for j in g.joins for i in range(len(j._input_metadata))]
    targets: list[torch.Tensor | GradientEdge] = [*inputs, *edges]
    results: Sequence[torch.Tensor | None] = ()
    if outputs and targets:
        results = torch.autograd.grad(outputs, targets, grads, retain_graph=True, allow_unused=True)
    else:
        results = (None,) * len(targets)
    captured = iter(results[len(inputs) :])
    for group in groups:
        group.grads = [tuple(next(captured) for _ in j._input_metadata) for j in group.joins]
    if saved is not None:
        saved.keep_only(node for group in groups for node in group.nodes)
    return tuple(results[: len(inputs)]), WeightGradient(groups, saved)
