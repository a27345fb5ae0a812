"""Megatron's mixed precision through ``make_engine``: bf16 weights, fp32 main gradients, fp32 masters.

At world 4 a small MLP (P = 280 parameters, one bucket, no padding) trains 3 steps of 2 micro-batches
with AdamW in DDP, ZeRO-1 and ZeRO-2 (``collectives="reduce_scatter"``), its weights in bf16.

- Parity between the modes in bf16: the fp32 masters agree to the fp32 default tolerance (rtol
  1.3e-6, atol 1e-5). The modes do the same arithmetic but for the order the reductions add in (fp32,
  ~1e-7 relative); at worst a master straddling a bf16 rounding boundary makes the next forward's
  weight differ by one bf16 ulp, which moves an Adam update of size ``LR`` by about ``2^-8 LR`` = 4e-6.
- Against fp32: the same run with fp32 weights from the same (bf16-rounded) start. bf16 rounds each
  weight and activation to 8 significant bits (epsilon 2^-8), so each step's gradients differ by a few
  epsilon relative, and Adam's normalised update of size ``LR`` by as much relative: after ``STEPS``
  steps the masters differ by at most ``STEPS * LR * 8 * 2^-8`` (8 epsilon of slack through the two
  layers). A run stepping the bf16 weights directly would lose updates below the bf16 spacing of the
  weights (2^-9 |w| ~ 1e-3 > LR here) and fail it. Losses: rtol 2e-2 (a few bf16 roundings).
- Communication per step, whatever the micro-batch count: DDP one all-reduce of the fp32 main
  gradients (4P bytes; 2P with ``reduce_dtype=bf16``); ZeRO one reduce-scatter of 4P (2P) and one
  all-gather of the bf16 weights (2P), plus the gradient norm's scalar all-reduce.
- Bytes per parameter after a step equal :func:`dp_shard.bytes_per_param`: 18, 6 + 12/4, 2 + 16/4; and
  ``checkpoint_pieces()`` saves the bf16 weights as their whole fp32 masters on every rank.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ClipGroups, bytes_per_param, make_engine
from pstate.comm import CommRecorder

WORLD, STEPS, MICRO, LR, P = 4, 3, 2, 1e-3, 280


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # both precisions start from the same values
    return model.to(dtype)


def batch(rank: int, step: int, micro: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(4, 8, generator=g).to(dtype), torch.randn(4, 8, generator=g).to(dtype)


def groups(named):
    return [{"params": list(named.items()), "weight_decay": 0.1}]


def train(zero: int, dtype: torch.dtype, reduce_dtype: torch.dtype | None = None):
    model = net(dtype)
    extra = {"collectives": "reduce_scatter"} if zero else {}
    engine = make_engine(
        zero,
        [model],
        group=dist.group.WORLD,
        param_groups=groups,
        optimizer_cls=torch.optim.AdamW,
        reduce_dtype=reduce_dtype,
        lr=LR,
        **extra,
    )
    recorder = CommRecorder({dist.group.WORLD: "dp"})
    losses = []
    for step in range(STEPS):
        recorder.clear()
        with recorder:
            engine.zero_grad()
            total = 0.0
            for m in range(MICRO):
                x, y = batch(dist.get_rank(), step, m, dtype)
                with engine.no_sync(0) if m < MICRO - 1 else nullcontext():
                    loss = F.mse_loss(engine.modules[0](x), y)
                    loss.backward()
                total += loss.item() / MICRO
            engine.finish_grad_sync()
            engine.step(float("inf"), ClipGroups())
        losses.append(total)
    comm = {op: (int(v["bytes"]), int(v["calls"])) for op, v in recorder.by_op("dp").items()}
    if zero:
        state = engine.optimizer.state_dict()["state"]
        masters = {k: (e["master_param"].flat_range, e["master_param"].data.clone()) for k, e in state.items()}
    else:
        masters = {k: ((0, p.numel()), engine.master(p).detach().reshape(-1).clone()) for k, p in engine.named.items()}
    saved = engine.checkpoint_pieces().params  # what a checkpoint saves: the fp32 masters, whole
    whole = {k: saved[k].data.reshape(-1).clone() for k in engine.named}
    return losses, masters, comm, engine.bytes_per_param(), whole


def full_masters(results) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master assembled from the ranks' flat ranges."""
    out = {}
    for _, masters, *_ in results:
        for key, ((start, stop), data) in masters.items():
            if stop > start:
                out.setdefault(key, {})[start] = data
    return {k: torch.cat([pieces[s] for s in sorted(pieces)]) for k, pieces in out.items()}


def expected_comm(zero: int, reduce_bytes: int) -> dict[str, tuple[int, int]]:
    if zero == 0:
        return {"all_reduce": (reduce_bytes * P, 1)}
    # and the gradient norm's partial sum (one fp32 scalar): each rank holds other gradient elements
    return {"reduce_scatter": (reduce_bytes * P, 1), "all_gather": (2 * P, 1), "all_reduce": (4, 1)}


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_weights_with_fp32_masters_match_ddp_and_fp32_and_reduce_once(run_ranks, zero):
    bf16 = run_ranks(WORLD, train, zero, torch.bfloat16)
    ddp = bf16 if zero == 0 else run_ranks(WORLD, train, 0, torch.bfloat16)
    fp32 = run_ranks(WORLD, train, zero, torch.float32)
    got, want_ddp, want_fp32 = full_masters(bf16), full_masters(ddp), full_masters(fp32)
    assert got.keys() == want_fp32.keys() and all(g.dtype == torch.float32 for g in got.values())
    for key in got:
        torch.testing.assert_close(got[key], want_ddp[key])
        torch.testing.assert_close(got[key], want_fp32[key], rtol=0, atol=STEPS * LR * 8 * 2**-8)
    table = bytes_per_param(zero, WORLD)
    for (losses, _, comm, per_param, whole), (losses32, *_) in zip(bf16, fp32):
        assert losses == pytest.approx(losses32, rel=2e-2)
        for key, value in whole.items():
            torch.testing.assert_close(value, got[key], rtol=0, atol=0)
        assert comm == expected_comm(zero, 4)
        assert per_param == pytest.approx(table)


@pytest.mark.parametrize("zero", [0, 1])
def test_bf16_reduction(run_ranks, zero):
    results = run_ranks(WORLD, train, zero, torch.bfloat16, torch.bfloat16)
    want = full_masters(run_ranks(WORLD, train, zero, torch.bfloat16))
    for key, got in full_masters(results).items():  # bf16 sums: one more rounding of the gradients
        torch.testing.assert_close(got, want[key], rtol=0, atol=STEPS * LR * 8 * 2**-8)
    for _, _, comm, *_ in results:
        assert comm == expected_comm(zero, 2)


def test_table():
    assert bytes_per_param(0, 8)["total"] == 18
    assert bytes_per_param(1, 8)["total"] == 6 + 12 / 8
    assert bytes_per_param(2, 8)["total"] == 2 + 16 / 8
    assert bytes_per_param(3, 8)["total"] == 18 / 8
    fp32 = {"weight_dtype": torch.float32, "master_dtype": None}
    assert [bytes_per_param(z, 4, **fp32)["total"] for z in range(4)] == [16, 10, 7, 4]
