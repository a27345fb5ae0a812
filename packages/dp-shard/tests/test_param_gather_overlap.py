"""ZeRO-1/2's parameter gathers overlapped with the next forward (``ShardedOptimizer.overlap_param_gather``).

World 2, a chain of three ``Linear`` layers of different sizes, one parameter per bucket (the smallest
bucket size), AdamW for three steps. Parity: the losses and the trained parameters equal those of the
same optimizer with synchronous gathers exactly (the same arithmetic; only when the gathers are waited
differs). Laziness: after ``step()`` every bucket's gather is in flight; a forward pre-hook registered
after the optimizer's on each layer sees only the later layers' buckets still pending, so each bucket
is waited by the first layer that uses it. Order: the gathers are launched in forward order (first
layer's parameters first), the reverse of the gradient buckets' backward order.
"""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ShardedOptimizer
from pstate.comm import CommRecorder

SIZES = [4, 6, 8, 10]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(SIZES)])


def sharded(model: nn.Module, stage: int, collectives: str) -> ShardedOptimizer:
    """AdamW sharded over the world with one parameter per bucket."""
    return ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        group=dist.group.WORLD,
        stage=stage,
        bucket_size_mb=1e-9,
        collectives=collectives,
        lr=1e-2,
    )


def train(stage: int, collectives: str, overlap: bool):
    model = net()
    optimizer = sharded(model, stage, collectives)
    if overlap:
        optimizer.overlap_param_gather([model])
    pending: list[list[int]] = []
    for layer in model:
        layer.register_forward_pre_hook(lambda *_: pending[-1].append(optimizer.pending_param_gathers()))
    losses, launched = [], []
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + dist.get_rank())
        x, y = torch.randn(5, SIZES[0], generator=g), torch.randn(5, SIZES[-1], generator=g)
        pending.append([])
        loss = F.mse_loss(model(x), y)
        loss.backward()
        recorder = CommRecorder()
        with recorder:
            optimizer.step()
        launched.append([r.bytes for r in recorder.records])
        optimizer.zero_grad()
        losses.append(loss.item())
    optimizer.wait_param_gather()
    return losses, [p.detach().clone() for p in model.parameters()], pending, launched


def both(stage: int, collectives: str):
    return train(stage, collectives, False), train(stage, collectives, True)


@pytest.mark.parametrize(("stage", "collectives"), [(1, "auto"), (2, "reduce_scatter")])
def test_gathers_are_waited_by_the_first_layer_that_uses_them_and_change_nothing(run_ranks, stage, collectives):
    sizes = [(a * b, b) for a, b in itertools.pairwise(SIZES)]  # (weight, bias) elements per layer
    for (losses, params, _, _), (lazy_losses, lazy_params, pending, launched) in run_ranks(2, both, stage, collectives):
        assert lazy_losses == losses
        for got, want in zip(lazy_params, params):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert pending[0] == [0, 0, 0]  # the first forward follows no step
        for seen in pending[1:]:  # after layer i's own wait: the 2 buckets of each later layer
            assert seen == [4, 2, 0]
        per_gather = 2 if collectives == "auto" else 1  # gloo's fallback: one broadcast per owner
        for step_bytes in launched:
            gathers = step_bytes[-len(sizes) * 2 * per_gather :]
            numels = [n for weight, bias in sizes for n in (weight, bias)]  # forward order
            padded = [-(-n // 2) * 2 for n in numels]
            if per_gather == 2:
                assert gathers == [4 * n // 2 for n in padded for _ in range(2)]
            else:
                assert gathers == [4 * n for n in padded]


V, H = 11, 6
ORDERS = ("tied-after", "tied-before", "later-first")


class Tied(nn.Module):
    """An embedding table ``emb``, two layers ``mid`` and ``out``, and a ``head`` whose weight is the table
    (tied by registration). ``order`` is how the forward reads them: ``tied-after``: the embedding, mid,
    out, then the table read by this module for the logits; ``tied-before``: the table read by this module
    first (an embedding by indexing, whose own forward never runs, as on a last pipeline stage), mid, out,
    then the tied head; ``later-first``: the embedding, then out's weight and bias read by this module
    before mid runs (out's forward never runs), mid, the tied head. ``seen``: whether each read by this
    module found its bucket still gathering (``probe``)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid, self.out = nn.Embedding(V, H), nn.Linear(H, H), nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.emb.weight
        self.order, self.seen, self.probe = order, [], lambda p: False

    def read(self, module: nn.Module, name: str) -> torch.Tensor:
        value = getattr(module, name)
        self.seen.append(self.probe(value))
        return value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.order == "tied-after":
            h = self.out(torch.tanh(self.mid(self.emb(ids))))
            return F.linear(h, self.read(self.emb, "weight"))
        if self.order == "tied-before":
            h = self.read(self.emb, "weight")[ids]
            return self.head(self.out(torch.tanh(self.mid(h))))
        h = torch.tanh(F.linear(self.emb(ids), self.read(self.out, "weight"), self.read(self.out, "bias")))
        return self.head(self.mid(h))


def train_tied(order: str, stage: int, collectives: str, overlap: bool):
    model = Tied(order)
    optimizer = sharded(model, stage, collectives)
    if overlap:
        optimizer.overlap_param_gather([model])
        model.probe = optimizer.param_gather_pending
    in_flight, losses = [], []
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + dist.get_rank())
        ids, targets = torch.randint(0, V, (5, 3), generator=g), torch.randint(0, V, (5 * 3,), generator=g)
        in_flight.append(optimizer.pending_param_gathers())
        loss = F.cross_entropy(model(ids).reshape(-1, V), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    optimizer.wait_param_gather()
    params = [p.detach().clone() for p in model.parameters()]
    return losses, params, model.seen, in_flight, type(model.emb).__name__


def tied_orders(stage: int, collectives: str):
    return {
        order: (train_tied(order, stage, collectives, False), train_tied(order, stage, collectives, True))
        for order in ORDERS
    }


@pytest.mark.parametrize(("stage", "collectives"), [(1, "auto"), (2, "reduce_scatter")])
def test_a_parameter_read_outside_its_modules_forward_waits_for_its_gather(run_ranks, stage, collectives):
    """A tied table read by another module before or after the embedding, and a later module's weight read
    before the earlier module runs: each read finds its bucket gathered (waited on the attribute read), the
    gathers still overlap the forward (in flight when it starts), and losses and parameters equal those of
    synchronous gathers exactly."""
    for result in run_ranks(2, tied_orders, stage, collectives):
        for order, (sync, lazy) in result.items():
            (losses, params, _, _, _), (lazy_losses, lazy_params, seen, in_flight, name) = sync, lazy
            assert lazy_losses == losses, order
            for got, want in zip(lazy_params, params):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert seen and not any(seen), f"{order}: a read found its bucket still gathering: {seen}"
            assert in_flight[0] == 0 and all(n == 5 for n in in_flight[1:]), order  # a bucket per parameter
            assert name == "Embedding"
