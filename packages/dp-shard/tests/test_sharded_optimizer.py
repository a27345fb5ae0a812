"""``ShardedOptimizer`` (ZeRO-1/2) against single-process AdamW on the concatenated batch.

Every rank builds the model after ``torch.manual_seed(SEED)`` and trains ``STEPS`` steps on its own
batches with two param groups (weights: weight decay 0.1 and lr 1e-2; biases: no decay and lr 5e-3)
and a ``LambdaLR`` schedule stepping both groups' lr. The reference in this process trains the same
model on every rank's batches with a loss that is the mean of the ranks' losses (what ``average=True``
computes). ``auto`` collectives over gloo all-reduce each bucket; ``reduce_scatter`` (the NCCL path) is
run too. Buckets are tiny (``bucket_size_mb=1e-4``, about 26 floats) so there are several and shard
boundaries cut through parameters.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5), as for ``DataParallel``: the
reduce-scatter adds the ranks' gradients in another order than one backward over the whole batch, which
changes only the last bits, and AdamW's normalised update does not amplify them. bf16 parameters (with
float32 masters and reduction) use rtol 2e-2, atol 1e-3: each rank's bf16 backward runs in another
process whose matmuls may round differently (one bf16 ulp, 2^-8 relative).

Memory is measured from the optimizer itself: the bytes of the wrapped optimizer's state tensors and of
the master shards on each rank, against the unsharded AdamW's state plus its (float32) parameters.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ShardedOptimizer

SEED, BATCH, IN, HIDDEN, STEPS = 1234, 4, 6, 8, 3
BUCKET_MB = 1e-4
BF16 = {"rtol": 2e-2, "atol": 1e-3}


def net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(SEED)
    layers = [nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN)]
    return nn.Sequential(*layers).to(dtype)


def groups(model, named=False):
    def pick(bias):
        return [(n, p) if named else p for n, p in model.named_parameters() if n.endswith("bias") == bias]

    return [
        {"params": pick(False), "weight_decay": 0.1, "lr": 1e-2},
        {"params": pick(True), "weight_decay": 0.0, "lr": 5e-3},
    ]


def schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def batch(rank, step, micro, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x, y = torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)
    return x.to(dtype), y.to(dtype)


def reference(ranks, *, micro=1, steps=STEPS):
    model = net()
    optimizer = torch.optim.AdamW(groups(model))
    scheduler = schedule(optimizer)
    for step in range(steps):
        for m in range(micro):
            loss = sum(F.mse_loss(model(batch(r, step, m)[0]), batch(r, step, m)[1]) for r in ranks) / len(ranks)
            loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer


def train(stage, *, micro=1, dtype=torch.float32, collectives="auto"):
    model = net(dtype)
    optimizer = ShardedOptimizer(
        groups(model),
        torch.optim.AdamW,
        group=dist.group.WORLD,
        stage=stage,
        bucket_size_mb=BUCKET_MB,
        collectives=collectives,
    )
    scheduler = schedule(optimizer)
    grad_bytes = None
    for step in range(STEPS):
        for m in range(micro):
            x, y = batch(dist.get_rank(), step, m, dtype)
            with optimizer.no_sync() if m < micro - 1 else nullcontext():
                F.mse_loss(model(x), y).backward()
        if step == 0:
            grad_bytes = optimizer.memory_bytes()["grad"]
            assert stage == 1 or all(p.grad is None for p in model.parameters())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    per_element = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.numel() > 1
    )
    masters = sum(m.numel() * m.element_size() for m in optimizer.master_params())
    buckets = len(optimizer.grads.slots)
    params = [p.detach().clone() for p in model.parameters()]
    return params, per_element + masters, grad_bytes, buckets


CASES = [(stage, dp, "auto") for stage in (1, 2) for dp in (2, 4)]
CASES += [(1, 2, "reduce_scatter"), (2, 4, "reduce_scatter")]


@pytest.mark.parametrize(("stage", "dp", "collectives"), CASES)
def test_equals_single_process_adamw_and_shards_the_state(run_ranks, stage, dp, collectives):
    results = run_ranks(dp, train, stage, collectives=collectives)
    model, optimizer = reference(list(range(dp)))
    numel = sum(p.numel() for p in model.parameters())
    # unsharded: exp_avg + exp_avg_sq + the float32 parameters themselves (its "master" weights)
    unsharded = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in optimizer.state.values()) + 4 * numel
    assert unsharded == 12 * numel
    for params, state_bytes, grad_bytes, buckets in results:
        for got, want in zip(params, model.parameters()):
            torch.testing.assert_close(got, want.detach())
        # each rank owns at most one shard of every bucket: numel / dp plus under one element per bucket
        assert state_bytes <= 12 * (numel / dp + buckets)
        if stage == 2:  # the gradient shard only (buckets padded to a multiple of dp)
            assert grad_bytes <= 4 * (numel / dp + buckets)
        else:  # the full local buffer, whose own piece of each bucket is the reduced shard
            assert 4 * numel <= grad_bytes <= 4 * (numel + buckets * dp)
    assert buckets == 3  # (bias, weight) pairs: several buckets, each of two parameters
    assert sum(r[1] for r in results) == unsharded  # every element's state is held exactly once


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_accumulation_over_micro_batches(run_ranks, stage):
    model, _ = reference([0, 1], micro=2)
    for params, *_ in run_ranks(2, train, stage, micro=2):
        for got, want in zip(params, model.parameters()):
            torch.testing.assert_close(got, want.detach())


def bf16_reference(dp):
    model = net(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    by_id = {id(p): m for p, m in zip(model.parameters(), masters)}
    master_groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups(model)]
    optimizer = torch.optim.AdamW(master_groups)
    scheduler = schedule(optimizer)
    for step in range(STEPS):
        grads = [torch.zeros_like(m) for m in masters]
        for rank in range(dp):
            model.zero_grad()
            x, y = batch(rank, step, 0, torch.bfloat16)
            F.mse_loss(model(x), y).backward()
            for g, p in zip(grads, model.parameters()):
                g += p.grad.float() / dp
        for m, g in zip(masters, grads):
            m.grad = g
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
    return model


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_parameters_with_fp32_masters_and_reduction(run_ranks, stage):
    model = bf16_reference(2)
    for params, state_bytes, *_ in run_ranks(2, train, stage, dtype=torch.bfloat16):
        for got, want in zip(params, model.parameters()):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.detach().float(), **BF16)
        numel = sum(p.numel() for p in model.parameters())
        assert state_bytes <= 12 * (numel / 2 + 10)  # float32 masters and moments, half of them


def named_with_closure():
    model = net()
    optimizer = ShardedOptimizer(list(model.named_parameters()), torch.optim.AdamW, group=dist.group.WORLD, lr=1e-2)
    for step in range(STEPS):
        x, y = batch(dist.get_rank(), step, 0)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()], sorted(optimizer.state_dict()["state"])


def test_named_parameters_and_closure(run_ranks):
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        optimizer.zero_grad()
        (sum(F.mse_loss(model(batch(r, step, 0)[0]), batch(r, step, 0)[1]) for r in (0, 1)) / 2).backward()
        optimizer.step()
    for params, keys in run_ranks(2, named_with_closure):
        assert keys == sorted(n for n, _ in model.named_parameters())
        for got, want in zip(params, model.parameters()):
            torch.testing.assert_close(got, want.detach())
