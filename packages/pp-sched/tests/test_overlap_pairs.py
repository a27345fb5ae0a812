"""Overlapped pairs: 1F1B's paired variant as data, the check that pairs can run as units, and the
executor running each pair of staged chunks interleaved (``overlap=True``) on real ranks (gloo).

The staged chunk here cuts a ``Linear`` + tanh stack between its layers (no collectives: the MoE layers
of ``moe_dispatch`` put their all-to-alls at such cuts; ``integration_tests/test_moe_overlap.py`` runs
those). A step with ``overlap=True`` must give the losses and gradients of the same schedule run with
``overlap=False`` (plain chunks, one action after the other). For 1F1B these are the same operations in
the same order, compared bitwise. DualPipe-V's unpaired backwards are split (``I`` now, ``W`` later) when
run in sequence but whole at the ``I`` with ``overlap=True``, so the microbatches' weight gradients are
added to ``.grad`` in another order: compared with torch's float32 tolerances (rtol 1.3e-6, atol 1e-5).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pp_sched import Action, PipelineExecutor, PipelineScheduleError, build, split_layers, validate
from pp_sched.overlap import merge_split_backward

SEED, LAYERS, HIDDEN, BATCH = 99, 8, 8, 3


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 5, 8, 16])
def test_paired_1f1b_pairs_its_steady_state_and_runs_as_units(pp, microbatches):
    schedule = build("1f1b", pp=pp, microbatches=microbatches, overlap=True)
    validate(schedule)
    for rank, (actions, pairs) in enumerate(zip(schedule.actions, schedule.pairs)):
        warmup = min(pp - rank, microbatches)
        assert [a.kind for a in actions[:warmup]] == ["F"] * warmup
        assert len(pairs) == microbatches - warmup
        for k in pairs:
            assert actions[k] == Action("F", actions[k + 1].microbatch + warmup)
            assert actions[k + 1].kind == "B"


def test_pairs_that_cannot_run_as_units_are_refused():
    # The last rank pairs F1 with B0, but rank 0 sends F1's activation only after its own pair (F1, B0)
    # has B0's gradient, which the last rank computes in its pair: a cycle, though in sequence it runs.
    plain = build("1f1b", pp=2, microbatches=4)
    last = [Action("F", 0)] + [a for k in range(3) for a in (Action("F", k + 1), Action("B", k))] + [Action("B", 3)]
    validate(plain.with_actions([plain.actions[0], last]))
    with pytest.raises(PipelineScheduleError, match="pairs cannot run as units"):
        validate(plain.with_actions([plain.actions[0], last], [[1, 3, 5], [1, 3, 5]]))


def test_overlap_is_refused_for_schedules_without_pairs():
    with pytest.raises(PipelineScheduleError, match="overlap=True: schedule 'zb-v'"):
        build("zb-v", pp=2, microbatches=4, overlap=True)
    assert any(build("dualpipe-v", pp=2, microbatches=4, overlap=True).pairs)


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("microbatches", [2, 5, 8])
def test_merged_split_backward_keeps_the_pairs_and_validates(pp, microbatches):
    split = build("dualpipe-v", pp=pp, microbatches=microbatches)
    merged = merge_split_backward(split)
    validate(merged)
    assert not merged.split_backward
    for rank in range(pp):
        assert [a for a in merged.actions[rank]] == [
            Action("B", a.microbatch, a.chunk) if a.kind == "I" else a for a in split.actions[rank] if a.kind != "W"
        ]
        merged_pairs = [merged.actions[rank][k : k + 2] for k in merged.pairs[rank]]
        split_pairs = [split.actions[rank][k : k + 2] for k in split.pairs[rank]]
        assert merged_pairs == split_pairs


class StagedStack(nn.Sequential):
    """A ``Sequential`` that can also run cut between its modules, logging each piece it runs."""

    log: list

    def staged_run(self):
        return _Run(list(self), self.log)


class _Run:
    count = 0

    def __init__(self, modules, log):
        self.modules, self.log = modules, log
        _Run.count += 1
        self.id = _Run.count

    def forward(self, *inputs):
        (value,) = inputs
        self.cuts = []
        for i, module in enumerate(self.modules):
            leaf = value.detach().requires_grad_(value.requires_grad) if i else value
            value = module(leaf)
            self.cuts.append((leaf, value))
            self.log.append(("F", self.id))
            if i < len(self.modules) - 1:
                yield
        return (value,)

    def backward(self, outputs, grads):
        grad = None
        for i in range(len(self.modules) - 1, -1, -1):
            leaf, out = self.cuts[i]
            if i == len(self.modules) - 1:
                torch.autograd.backward(list(outputs), list(grads))
            else:
                torch.autograd.backward([out], [grad])
            grad = leaf.grad
            self.log.append(("B", self.id))
            if i:
                yield
        return (grad,)


def chunks_of(rank, pp, vpp, layout, log):
    torch.manual_seed(SEED)
    layers = [nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]
    chunks = []
    for stage in split_layers(LAYERS, pp=pp, vpp=vpp, layout=layout):
        if stage.rank == rank:
            chunk = StagedStack(*[m for i in stage.layers for m in (layers[i], nn.Tanh())])
            chunk.log = log
            chunks.append(chunk)
    return chunks


def train(name, pp, microbatches, overlap):
    rank = dist.get_rank()
    schedule = build(name, pp=pp, microbatches=microbatches, overlap=True)
    log = []
    chunks = chunks_of(rank, pp, schedule.vpp, schedule.layout, log)
    executor = PipelineExecutor(
        schedule, chunks, dist.group.WORLD, lambda out, y: nn.functional.mse_loss(out, y), overlap=overlap
    )
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(microbatches, BATCH, HIDDEN, generator=g), torch.randn(microbatches, BATCH, HIDDEN, generator=g)
    last = schedule.rank_of(schedule.num_stages - 1)
    result = executor.step(list(x) if rank == 0 else None, list(y) if rank == last else None)
    grads = [p.grad for c in chunks for p in c.parameters()]
    # Interleaved: some forward piece runs between two pieces of another run's backward.
    interleaved = any(a[0] == "B" and b[0] == "F" and c == a and a[1] != b[1] for a, b, c in zip(log, log[1:], log[2:]))
    return result.losses, grads, interleaved if executor.schedule.pairs[rank] else None


@pytest.mark.parametrize(("name", "pp", "microbatches"), [("1f1b", 2, 5), ("dualpipe-v", 2, 6)])
def test_overlapped_pairs_equal_the_same_schedule_run_in_sequence(run_ranks, name, pp, microbatches):
    on = run_ranks(pp, train, name, pp, microbatches, True)
    off = run_ranks(pp, train, name, pp, microbatches, False)
    for (losses, grads, interleaved), (losses_off, grads_off, interleaved_off) in zip(on, off):
        assert len(losses) == len(losses_off)
        for a, b in zip(losses, losses_off):
            assert torch.equal(a, b)  # forwards are the same in both
        for a, b in zip(grads, grads_off):
            if name == "1f1b":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b)
        assert interleaved in (True, None) and not interleaved_off  # None: this rank has no pair
