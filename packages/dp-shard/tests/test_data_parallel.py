"""``DataParallel`` against a single-process model trained on the whole batch and against torch DDP.

Every rank builds the model after ``torch.manual_seed(SEED)`` and trains ``STEPS`` steps of AdamW on
its own batches (drawn from the rank's global index, the step and the micro-batch). The reference in
this process trains the same model on all of them: its loss is the mean of the ranks' losses (each a
mean over its local batch), which is what ``average=True`` computes. Unused parameters get zero
gradients, not ``None``, in all three (the reference zeroes with ``set_to_none=False``; torch DDP too),
so AdamW updates them identically.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5): the all-reduce adds the
ranks' gradients in another order than one backward over the whole batch, which changes only the
last bits, and AdamW's normalised update does not amplify them.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dp_shard import DataParallel, DataParallelError

SEED, BATCH, IN, HIDDEN, STEPS, LR = 1234, 4, 6, 8, 3, 1e-2


class Net(nn.Module):
    """A small MLP; ``extra`` is skipped when ``use_extra`` is false; ``tied`` shares a weight."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, HIDDEN)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.extra = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, HIDDEN)
        if tied:
            self.head.weight = self.hidden.weight

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = torch.tanh(self.hidden(torch.tanh(self.embed(x))))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


def batch(rank: int, step: int, micro: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x, y = torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)
    return x.to(dtype), y.to(dtype)


def uses_extra(group_rank: int, step: int, unused: bool) -> bool:
    """With ``unused``: step 1 no rank uses ``extra``; step 2 only group rank 0 does."""
    return not unused or step == 0 or (step == 2 and group_rank == 0)


def reference(ranks, *, micro=1, unused=False, tied=False):
    torch.manual_seed(SEED)
    model = Net(tied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        for m in range(micro):
            loss = 0.0
            for group_rank, rank in enumerate(ranks):
                x, y = batch(rank, step, m)
                loss = loss + F.mse_loss(model(x, uses_extra(group_rank, step, unused)), y) / len(ranks)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return [p.detach() for p in model.parameters()]


def dp_group(groups):
    """The world, or this rank's group among ``groups`` (every rank creates every group)."""
    if groups is None:
        return dist.group.WORLD
    made = [dist.new_group(ranks) for ranks in groups]
    return next(g for g, ranks in zip(made, groups) if dist.get_rank() in ranks)


def train(wrap, model, group, *, micro, unused, sync_call):
    rank, group_rank = dist.get_rank(), dist.get_rank(group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        for m in range(micro):
            x, y = batch(rank, step, m)
            with wrap.no_sync() if m < micro - 1 else nullcontext():
                F.mse_loss(wrap(x, uses_extra(group_rank, step, unused)), y).backward()
        sync_call()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return [p.detach().clone() for p in model.parameters()]


def run_training(groups=None, *, bucket_size_mb=25.0, overlap=True, micro=1, unused=False, tied=False):
    group = dp_group(groups)
    torch.manual_seed(SEED)
    model = Net(tied)
    ours = DataParallel(model, group=group, bucket_size_mb=bucket_size_mb, overlap=overlap)
    mine = train(ours, model, group, micro=micro, unused=unused, sync_call=ours.finish_grad_sync)
    torch.manual_seed(SEED)
    model = Net(tied)
    theirs = DistributedDataParallel(
        model, process_group=group, bucket_cap_mb=bucket_size_mb, find_unused_parameters=unused
    )
    torch_ddp = train(theirs, model, group, micro=micro, unused=unused, sync_call=lambda: None)
    return mine, torch_ddp, len(ours._buckets)


def check(results, groups, **options):
    """Every rank's parameters (ours and torch DDP's) equal its group's single-process reference."""
    for group in groups:
        expected = reference(group, **options)
        for rank in group:
            mine, torch_ddp, _ = results[rank]
            assert len(mine) == len(expected)
            for ours, theirs, ref in zip(mine, torch_ddp, expected):
                torch.testing.assert_close(ours, ref)
                torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dp", [2, 4])
def test_equals_single_process_and_torch_ddp(run_ranks, dp):
    check(run_ranks(dp, run_training), [list(range(dp))])


@pytest.mark.parametrize("overlap", [True, False])
def test_small_buckets_with_and_without_overlap(run_ranks, overlap):
    results = run_ranks(2, run_training, bucket_size_mb=1e-4, overlap=overlap)  # ~26 floats per bucket
    assert results[0][2] >= 4
    check(results, [[0, 1]])


def test_no_sync_accumulates_micro_batches(run_ranks):
    check(run_ranks(2, run_training, micro=2, bucket_size_mb=1e-4), [[0, 1]], micro=2)


@pytest.mark.parametrize("dp", [2, 4])
def test_parameter_unused_in_some_steps_and_on_some_ranks(run_ranks, dp):
    check(run_ranks(dp, run_training, unused=True, bucket_size_mb=1e-4), [list(range(dp))], unused=True)


def test_tied_parameters_are_managed_once(run_ranks):
    results = run_ranks(2, run_training, tied=True, bucket_size_mb=1e-4, micro=2)
    check(results, [[0, 1]], tied=True, micro=2)


def test_subgroups_reduce_within_their_group(run_ranks):
    groups = [[0, 1], [2, 3]]
    check(run_ranks(4, run_training, groups, bucket_size_mb=1e-4), groups)


def launched_during_backward(overlap):
    model = DataParallel(Net(), group=dist.group.WORLD, bucket_size_mb=1e-4, overlap=overlap)
    x, y = batch(dist.get_rank(), 0, 0)
    F.mse_loss(model(x), y).backward()
    launched = model.buckets_started
    model.finish_grad_sync()
    return launched, len(model._buckets)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_starts_every_bucket_during_backward(run_ranks, overlap):
    launched, buckets = run_ranks(2, launched_during_backward, overlap)[0]
    assert launched == (buckets if overlap else 0)


def forgotten_sync():
    model = DataParallel(Net(), group=dist.group.WORLD)
    x, y = batch(dist.get_rank(), 0, 0)
    F.mse_loss(model(x), y).backward()
    errors = []
    for call in (lambda: model(x), model.zero_grad_buffer, lambda: F.mse_loss(model.module(x), y).backward()):
        try:
            call()
        except DataParallelError as error:
            errors.append(str(error))
    model.finish_grad_sync()
    model(x)  # fine again
    return errors


def test_missing_finish_grad_sync_is_an_error(run_ranks):
    for errors in run_ranks(2, forgotten_sync):
        assert len(errors) == 3
        assert all("finish_grad_sync()" in e for e in errors)
