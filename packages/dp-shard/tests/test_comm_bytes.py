"""Bytes per step on the data-parallel axis, recorded by ``pstate.comm``, against the analytic formula.

Each mode trains a small MLP (P = 280 parameters, fp32, a multiple of the world size 4 so no bucket or
FSDP shard is padded) for two steps at world 4 with 1 and with 3 micro-batches per step, and records
the second step. The formulas (payload bytes as :mod:`pstate.comm` counts them):

- DDP: one all-reduce of the gradient buffer, ``4P`` bytes;
- ZeRO-1 and ZeRO-2 (``collectives="reduce_scatter"``): a reduce-scatter of ``4P`` and an all-gather of
  the updated parameters, ``4P``;
- ZeRO-3 (two units): an all-gather of every unit for each forward and again for each backward,
  ``2 * 4P`` per micro-batch, and one reduce-scatter of ``4P``.

The gradient reduction is the same whatever the micro-batch count (``no_sync`` for all but the last):
each element is reduced once per step. The trained parameters also equal one process's SGD on every
rank's micro-batches (fp32 default tolerance: only the summation order differs).
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import DataParallel, ShardedOptimizer, fully_shard
from dp_shard.fully_shard import sharded_state
from pstate.comm import CommRecorder

WORLD, P, LR = 4, 280, 0.1


def net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)


def train(mode: str, micro: int) -> tuple[dict, list[torch.Tensor]]:
    model = net()
    if mode == "ddp":
        wrapped = DataParallel(model, group=dist.group.WORLD)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        no_sync, finish = wrapped.no_sync, wrapped.finish_grad_sync
    elif mode in ("zero1", "zero2"):
        wrapped = model
        optimizer = ShardedOptimizer(
            model.parameters(),
            torch.optim.SGD,
            group=dist.group.WORLD,
            stage=int(mode[-1]),
            collectives="reduce_scatter",
            finish_in_backward=False,
            lr=LR,
        )
        no_sync, finish = optimizer.no_sync, optimizer.finish_grad_sync
    else:
        wrapped = fully_shard(model, group=dist.group.WORLD, units=[model[0], model[2]])
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        state = sharded_state(model)
        no_sync, finish = state.no_sync, state.finish_grad_sync
    recorder = CommRecorder({dist.group.WORLD: "dp"})
    for step in range(2):
        recorder.clear()
        with recorder:
            for m in range(micro):
                x, y = batch(dist.get_rank(), step, m)
                with no_sync() if m < micro - 1 else nullcontext():
                    F.mse_loss(wrapped(x), y).backward()
            finish()
            optimizer.step()
        optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]  # ZeRO-3: this rank's pieces
    totals = {op: (int(v["bytes"]), int(v["calls"])) for op, v in recorder.by_op("dp").items()}
    assert set(recorder.by_axis()) == {"dp"}
    return totals, params


def reference(micro: int) -> list[torch.Tensor]:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(2):
        for rank in range(WORLD):
            for m in range(micro):
                x, y = batch(rank, step, m)
                (F.mse_loss(model(x), y) / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


def expected(mode: str, micro: int) -> dict[str, tuple[int, int]]:
    if mode == "ddp":
        return {"all_reduce": (4 * P, 1)}
    if mode in ("zero1", "zero2"):
        return {"reduce_scatter": (4 * P, 1), "all_gather": (4 * P, 1)}
    return {"all_gather": (2 * 4 * P * micro, 4 * micro), "reduce_scatter": (4 * P, 2)}


def both(mode: str) -> list[tuple[dict, list[torch.Tensor]]]:
    return [train(mode, micro) for micro in (1, 3)]


@pytest.mark.parametrize("mode", ["ddp", "zero1", "zero2", "zero3"])
def test_bytes_per_step_equal_the_formula_whatever_the_micro_batch_count(run_ranks, mode):
    assert sum(p.numel() for p in net().parameters()) == P
    results = run_ranks(WORLD, both, mode)
    refs = {micro: reference(micro) for micro in (1, 3)}
    for rank, per_micro in enumerate(results):
        for micro, (totals, params) in zip((1, 3), per_micro):
            assert totals == expected(mode, micro), (rank, micro)
            if mode == "zero3":  # this rank's pieces: its slice of each unit's flattened parameters
                units = [torch.cat([p.reshape(-1) for p in refs[micro][i : i + 2]]) for i in (0, 2)]
                want = torch.cat([u[rank * u.numel() // WORLD :][: u.numel() // WORLD] for u in units])
                torch.testing.assert_close(torch.cat([p.reshape(-1) for p in params]), want)
            else:
                for got, want in zip(params, refs[micro]):
                    torch.testing.assert_close(got, want)
