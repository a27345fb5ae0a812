"""``LossScaler``: the scale schedule, skipped steps on overflow, and fp16 training against one process.

fp16 runs: every rank builds an fp16 model; ``ShardedOptimizer`` keeps float32 masters and reduces
float32 gradients. At step ``OVERFLOW`` rank 1's input holds 1e5 (inf in fp16), so its gradients are
inf/nan and every rank must skip that step. The reference in this process runs each rank's fp16
backward of the scaled loss, averages the gradients in float32, unscales them and steps float32
masters with the same scaler, skipping the same step. Tolerance rtol 1e-2, atol 1e-3: each rank's
fp16 backward runs in another process, whose matmuls may round differently (an fp16 ulp, 2^-11
relative), and a few AdamW steps from ``lr=1e-2`` keep that well inside. The scale sequence and the
skipped steps must match exactly.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import DataParallel, DataParallelError, LossScaler, ShardedOptimizer

SEED, BATCH, IN, HIDDEN, STEPS, OVERFLOW, LR = 1234, 4, 6, 8, 5, 1, 1e-2
FP16 = {"rtol": 1e-2, "atol": 1e-3}


def net(dtype) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN)).to(dtype)


def batch(rank, step, dtype):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)
    if step == OVERFLOW and rank == 1:
        x[0, 0] = 1e5
    return x.to(dtype), y.to(dtype)


def scaler():
    return LossScaler(2.0**10, growth_interval=2)


def test_scale_schedule():
    s = LossScaler(8.0, growth_interval=2, min_scale=2.0, max_scale=16.0)
    scales = []
    for found_inf in [True, True, True, False, False, False, False, False, False, True]:
        s.update(found_inf)
        scales.append(s.scale)
    assert scales == [4.0, 2.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0, 16.0, 8.0]
    assert s.state_dict() == {"scale": 8.0, "growth_tracker": 0}
    t = LossScaler()
    t.load_state_dict({"scale": 4.0, "growth_tracker": 1})
    assert (t.scale, t.growth_tracker) == (4.0, 1)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"init_scale": 0.0}, "0 < min_scale <= init_scale"),
        ({"growth_factor": 1.0}, "growth_factor=1.0"),
        ({"backoff_factor": 1.0}, "backoff_factor=1.0"),
        ({"growth_interval": 0}, "growth_interval=0"),
    ],
)
def test_bad_settings(options, words):
    with pytest.raises(DataParallelError, match=words):
        LossScaler(**options)


def train_fp16(stage):
    model = net(torch.float16)
    loss_scaler = scaler()
    optimizer = ShardedOptimizer(
        model.parameters(), torch.optim.AdamW, group=dist.group.WORLD, stage=stage, loss_scaler=loss_scaler, lr=LR
    )
    scales, unchanged = [], None
    for step in range(STEPS):
        x, y = batch(dist.get_rank(), step, torch.float16)
        loss_scaler.scale_loss(F.mse_loss(model(x), y)).backward()
        before = [p.detach().clone() for p in model.parameters()], _state(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        if step == OVERFLOW:
            after = [p.detach().clone() for p in model.parameters()], _state(optimizer)
            unchanged = all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
        scales.append(loss_scaler.scale)
    return [p.detach().clone() for p in model.parameters()], scales, unchanged


def _state(optimizer):
    return [v.clone() for s in optimizer.state.values() for v in s.values()]


def fp16_reference(dp):
    model = net(torch.float16)
    masters = [p.detach().float().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(masters, lr=LR)
    loss_scaler = scaler()
    scales = []
    for step in range(STEPS):
        grads = [torch.zeros_like(m) for m in masters]
        for rank in range(dp):
            model.zero_grad()
            x, y = batch(rank, step, torch.float16)
            loss_scaler.scale_loss(F.mse_loss(model(x), y)).backward()
            for g, p in zip(grads, model.parameters()):
                g += p.grad.float() / dp
        for m, g in zip(masters, grads):
            m.grad = g
        found_inf = loss_scaler.unscale_(grads)
        loss_scaler.update(found_inf)
        if not found_inf:
            optimizer.step()
            with torch.no_grad():
                for p, m in zip(model.parameters(), masters):
                    p.copy_(m)
        scales.append(loss_scaler.scale)
    return list(model.parameters()), scales


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_sharded_training_skips_overflow_and_equals_one_process(run_ranks, stage):
    expected, expected_scales = fp16_reference(2)
    assert expected_scales == [1024.0, 512.0, 512.0, 1024.0, 1024.0]  # lowered, then raised after 2 clean steps
    for params, scales, unchanged in run_ranks(2, train_fp16, stage):
        assert scales == expected_scales
        assert unchanged  # the overflowing step changed no parameter and no optimizer state
        for got, want in zip(params, expected):
            torch.testing.assert_close(got.float(), want.detach().float(), **FP16)


def train_data_parallel():
    model = net(torch.float32)
    ddp = DataParallel(model, group=dist.group.WORLD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loss_scaler = scaler()
    stepped = []
    for step in range(STEPS):
        x, y = batch(dist.get_rank(), step, torch.float32)
        x = x * torch.inf if step == OVERFLOW and dist.get_rank() == 1 else x
        loss_scaler.scale_loss(F.mse_loss(ddp(x), y)).backward()
        ddp.finish_grad_sync()
        stepped.append(loss_scaler.step(optimizer))
        ddp.zero_grad_buffer()
    return [p.detach().clone() for p in model.parameters()], stepped, loss_scaler.scale


def test_data_parallel_with_a_torch_optimizer(run_ranks):
    model = net(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(STEPS):
        if step == OVERFLOW:
            continue
        loss = sum(
            F.mse_loss(model(batch(r, step, torch.float32)[0]), batch(r, step, torch.float32)[1]) for r in (0, 1)
        )
        (loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    for params, stepped, scale in run_ranks(2, train_data_parallel):
        assert stepped == [step != OVERFLOW for step in range(STEPS)] and scale == 1024.0
        for got, want in zip(params, model.parameters()):
            torch.testing.assert_close(got, want.detach())
