"""bf16 parameters with fp32 gradient buffers: gradients accumulate and are reduced in fp32.

Each rank runs its model in bf16; ``DataParallel(grad_dtype=torch.float32)`` adds every bf16 gradient
into the parameter's fp32 ``main_grad`` (freeing ``.grad``) and all-reduces the fp32 buffers. The
optimizer steps fp32 master copies whose ``.grad`` is ``main_grad``, then copies them back into the
bf16 parameters. The reference in this process does the same with one bf16 backward per rank, the
fp32 mean of their gradients, and the same master-weight AdamW.

Tolerance: rtol 2e-2, atol 1e-3. The bf16 backward of a rank's batch runs in another process, whose
matmuls may accumulate in another order (thread count), so gradients can differ by a bf16 rounding
(2^-8 relative); the fp32 reduction itself adds nothing comparable.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import DataParallel

SEED, BATCH, IN, HIDDEN, STEPS, LR = 1234, 4, 6, 8, 3, 1e-2

TOLERANCE = {"rtol": 2e-2, "atol": 1e-3}


def net() -> nn.Module:
    layers = [nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN)]
    return nn.Sequential(*layers)


def batch(rank, step, micro, dtype):
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x, y = torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)
    return x.to(dtype), y.to(dtype)


def masters_of(model):
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    return masters, torch.optim.AdamW(masters, lr=LR, weight_decay=0.1)


def step(model, masters, optimizer, grads):
    for master, grad in zip(masters, grads):
        master.grad = grad
    optimizer.step()
    with torch.no_grad():
        for p, master in zip(model.parameters(), masters):
            p.copy_(master)


def run_bf16():
    torch.manual_seed(SEED)
    model = net().to(torch.bfloat16)
    ddp = DataParallel(model, group=dist.group.WORLD, grad_dtype=torch.float32, bucket_size_mb=1e-4)
    masters, optimizer = masters_of(model)
    first_grads = None
    for s in range(STEPS):
        x, y = batch(dist.get_rank(), s, 0, torch.bfloat16)
        F.mse_loss(ddp(x), y).backward()
        ddp.finish_grad_sync()
        assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in model.parameters())
        grads = [p.main_grad for p in model.parameters()]
        first_grads = first_grads or [g.clone() for g in grads]
        step(model, masters, optimizer, grads)
        ddp.zero_grad_buffer()
    return first_grads, [m.detach() for m in masters]


def reference(dp):
    torch.manual_seed(SEED)
    model = net().to(torch.bfloat16)
    masters, optimizer = masters_of(model)
    first_grads = None
    for s in range(STEPS):
        grads = [torch.zeros_like(m) for m in masters]
        for rank in range(dp):
            model.zero_grad()
            x, y = batch(rank, s, 0, torch.bfloat16)
            F.mse_loss(model(x), y).backward()
            for g, p in zip(grads, model.parameters()):
                g += p.grad.float() / dp
        first_grads = first_grads or [g.clone() for g in grads]
        step(model, masters, optimizer, grads)
    return first_grads, masters


def test_bf16_parameters_with_fp32_gradient_reduction(run_ranks):
    expected_grads, expected_masters = reference(2)
    for grads, masters in run_ranks(2, run_bf16):
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, **TOLERANCE)
        for got, want in zip(masters, expected_masters):
            torch.testing.assert_close(got, want.detach(), **TOLERANCE)
