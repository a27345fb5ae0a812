"""``fully_shard(param_dtype=torch.bfloat16)``: bf16 compute, fp32 master shards, fp32 gradient reduction.

Two references, trained in this process on the same batches with AdamW (fp32 state):

- the emulation: fp32 master parameters; for each rank's batch a bf16 copy of the model computes the
  loss (of the output cast to fp32) and its bf16 gradients, which are cast to fp32, divided by the group
  size and summed over ranks; this is the computation FSDP distributes, so each step's gradients and
  parameters are compared with fp32's tolerance (rtol 1e-5, atol 1e-5: the reduce-scatter may add the
  ranks' fp32 gradients in another order). It runs on one thread like the ranks, because bf16 CPU
  kernels (LayerNorm's backward) round differently with several threads;
- the plain fp32 model: bf16 rounds parameters, activations and gradients to 8 significant bits, and
  AdamW's update is about ``lr`` per element whatever the gradient's size, so over ``STEPS`` steps a
  parameter can end up to ``2 * lr * STEPS`` (6e-2) away where a tiny gradient's sign flips (seen:
  2.3e-2); that is the bound, and the mean difference must stay far below it (< 1e-3; seen: 3e-4).
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard.fully_shard import fully_shard

SEED, BATCH, IN, HIDDEN, STEPS, LR = 7, 8, 6, 16, 3, 1e-2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


def build() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), Block(), Block(), nn.Linear(HIDDEN, IN))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, IN, generator=generator)


def train_sharded():
    """Per step: the gradient pieces and the parameter pieces after the optimizer step."""
    steps = []
    model = fully_shard(build(), group=dist.group.WORLD, units=Block, param_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        x, y = batch(dist.get_rank(), step)
        output = model(x)
        assert output.dtype == torch.bfloat16
        F.mse_loss(output.float(), y).backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        steps.append((grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    return steps


def emulated(world: int) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    steps = []
    master = build()
    optimizer = torch.optim.AdamW(master.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in master.parameters()]
        for rank in range(world):
            compute = copy.deepcopy(master).to(torch.bfloat16)
            x, y = batch(rank, step)
            F.mse_loss(compute(x.to(torch.bfloat16)).float(), y).backward()
            for t, p in zip(total, compute.parameters()):
                t.add_(p.grad.float() / world)
        for p, t in zip(master.parameters(), total):
            p.grad = t
        optimizer.step()
        grads = {n: p.grad.clone() for n, p in master.named_parameters()}
        steps.append((grads, {n: p.detach().clone() for n, p in master.named_parameters()}))
    return steps


def plain_fp32(world: int) -> dict[str, torch.Tensor]:
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        sum(F.mse_loss(model(x), y) / world for x, y in (batch(r, step) for r in range(world))).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def full(pieces: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.cat([p[n] for p in pieces]).view(t.shape) for n, t in like.items()}


@pytest.mark.parametrize("dp", [2, 4])
def test_bf16_compute_with_fp32_master_shards(run_ranks, dp):
    results = run_ranks(dp, train_sharded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: bf16 kernels round differently with more threads
    try:
        exact, loose = emulated(dp), plain_fp32(dp)
    finally:
        torch.set_num_threads(threads)
    for step, (grads, params) in enumerate(exact):
        mine = [full([r[step][i] for r in results], like) for i, like in enumerate((grads, params))]
        for name in grads:
            for got, expected in zip(mine, (grads, params)):
                torch.testing.assert_close(
                    got[name], expected[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}"
                )
    final = full([r[-1][1] for r in results], loose)
    differences = torch.cat([(final[n] - loose[n]).abs().reshape(-1) for n in loose])
    assert differences.max() <= 2 * LR * STEPS
    assert differences.mean() < 1e-3
