"""``make_engine(average=False)``: every mode sums the gradients over the data-parallel ranks, so a loop
that weights each rank's loss by ``1/world`` trains exactly as the averaging engine does.

At world 4 a small MLP trains 3 steps of 2 micro-batches with AdamW in DDP, ZeRO-1, ZeRO-2 and ZeRO-3,
in fp32 and with fp16 weights (ZeRO-3: fp32 shards gathered in fp16) under a dynamic loss scale.
Multiplying by ``1/4`` before backward instead of dividing by 4 before the reduction is exact in binary
floating point (a power of two), so the two runs agree to fp32's last bits (rtol 1e-6); a mode that
averaged as well would be off by 4x in its gradients, which AdamW's normalised update hides only in
part (the first steps of the bias-corrected update are scale-free, so the test compares the gradients
the step used too).
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ClipGroups, LossScaler, make_engine

WORLD, STEPS, MICRO = 4, 3, 2


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).to(dtype)


def train(zero: int, sixteen: bool, average: bool):
    fsdp16 = sixteen and zero == 3  # ZeRO-3: fp32 shards, fp16 gathers
    model = net(torch.float16 if sixteen and not fsdp16 else torch.float32)
    engine = make_engine(
        zero,
        [model],
        group=dist.group.WORLD,
        param_groups=lambda named: [{"params": list(named.items())}],
        optimizer_cls=torch.optim.AdamW,
        param_dtype=torch.float16 if fsdp16 else None,
        average=average,
        lr=1e-2,
    )
    scaler = LossScaler(2.0**8) if sixteen else None
    weight = (1.0 if scaler is None else scaler.scale) / (1 if average else WORLD)
    grads = []
    for step in range(STEPS):
        engine.zero_grad()
        for m in range(MICRO):
            g = torch.Generator().manual_seed(100 * step + 10 * m + dist.get_rank())
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
            dtype = torch.float16 if sixteen else torch.float32
            with engine.no_sync(0) if m < MICRO - 1 else nullcontext():
                loss = F.mse_loss(engine.modules[0](x.to(dtype)).float(), y) / MICRO
                (loss * weight).backward()
        engine.finish_grad_sync()
        grads.append([g.detach().clone() / (1 if scaler is None else scaler.scale) for g in engine.main_grads()])
        _, skipped = engine.step(float("inf"), ClipGroups(), scaler)
        assert not skipped
    return grads, [p.detach().float().clone() for p in engine.named.values()]


@pytest.mark.parametrize("sixteen", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_summed_gradients_of_weighted_losses_equal_the_average(run_ranks, zero, sixteen):
    averaged = run_ranks(WORLD, train, zero, sixteen, True)
    summed = run_ranks(WORLD, train, zero, sixteen, False)
    for (grads_a, params_a), (grads_s, params_s) in zip(averaged, summed):
        for step_a, step_s in zip(grads_a, grads_s):
            for a, s in zip(step_a, step_s):
                torch.testing.assert_close(s, a, rtol=1e-6, atol=0)
        for a, s in zip(params_a, params_s):
            torch.testing.assert_close(s, a, rtol=1e-6, atol=0)
