"""``make_engine``: one loop drives DDP, ZeRO-1, ZeRO-2 and ZeRO-3, and each matches one process.

At world 4 every mode trains a small MLP (P = 280 fp32 parameters; buckets and units
split evenly over 4 ranks) for 2 steps of 2 micro-batches with AdamW, clipping at 0.05 (it clips: the
norm is above it) through :meth:`DataParallelEngine.step`, with the same code for every mode. The
reference is one process's AdamW and ``clip_grad_norm_`` on the mean over ranks of the summed
micro-batch losses. Tolerance: ``torch.testing``'s fp32 default (only summation order differs).

Bytes per parameter after a step, against the table for fp32 parameters that are their own masters
(d = 4): DDP 4 + 4 + 8 = 16; ZeRO-1 4 + 4 + 8/d = 10 (the full local gradient buffer, whose own piece
of each bucket is the reduced shard); ZeRO-2 4 + 4/d + 8/d = 7; ZeRO-3 (4 + 4 + 8)/d = 4.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ClipGroups, make_engine

WORLD, STEPS, MICRO, MAX_NORM = 4, 2, 2, 0.05


def net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)


def groups(named):
    return [{"params": list(named.items()), "weight_decay": 0.1}]


def train(zero: int):
    model = net()
    engine = make_engine(
        zero,
        [model],
        group=dist.group.WORLD,
        param_groups=groups,
        optimizer_cls=torch.optim.AdamW,
        units=lambda chunk: [chunk[0], chunk[2]],
        lr=1e-2,
    )
    norms = []
    for step in range(STEPS):
        engine.zero_grad()
        for m in range(MICRO):
            x, y = batch(dist.get_rank(), step, m)
            with engine.no_sync(0) if m < MICRO - 1 else nullcontext():
                F.mse_loss(engine.modules[0](x), y).backward()
        engine.finish_grad_sync()
        norm, skipped = engine.step(MAX_NORM, ClipGroups())
        assert not skipped
        norms.append(norm)
    return [p.detach().clone() for p in model.parameters()], norms, engine.bytes_per_param()


def reference():
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for rank in range(WORLD):
            for m in range(MICRO):
                x, y = batch(rank, step, m)
                (F.mse_loss(model(x), y) / WORLD).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
    return [p.detach() for p in model.parameters()], norms


TABLE = {0: (4, 4, 8), 1: (4, 4, 2), 2: (4, 1, 2), 3: (1, 1, 2)}


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_one_loop_for_every_mode_matches_one_process(run_ranks, zero):
    want, want_norms = reference()
    assert min(want_norms) > MAX_NORM  # the clipping is exercised
    for rank, (params, norms, per_param) in enumerate(run_ranks(WORLD, train, zero)):
        assert norms == pytest.approx(want_norms, rel=1e-5)
        if zero == 3:  # this rank's pieces: its slice of each unit's flattened parameters
            units = [torch.cat([p.reshape(-1) for p in want[i : i + 2]]) for i in (0, 2)]
            flat = torch.cat([u[rank * u.numel() // WORLD :][: u.numel() // WORLD] for u in units])
            torch.testing.assert_close(torch.cat([p.reshape(-1) for p in params]), flat)
        else:
            for got, expected in zip(params, want):
                torch.testing.assert_close(got, expected)
        params_b, grads_b, optimizer_b = TABLE[zero]
        assert per_param == {
            "params": params_b,
            "grads": grads_b,
            "optimizer": optimizer_b,
            "total": params_b + grads_b + optimizer_b,
        }
