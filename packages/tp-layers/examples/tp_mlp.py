"""A sequence-parallel MLP block on 2 ranks, checked against the same block on one process.

    torchrun --nproc-per-node 2 packages/tp-layers/examples/tp_mlp.py

Runs on CPU (gloo) or one GPU per rank (NCCL): ``pstate.initialize`` picks the backend from the device.
"""

import torch
import torch.nn.functional as F
from torch import nn

import pstate
from tp_layers import ColumnParallelLinear, RowParallelLinear, allreduce_sequence_parallel_grads, mark_sequence_parallel

HIDDEN, SEQ, BATCH = 64, 16, 2


class Block(nn.Module):
    """Pre-norm residual MLP on ``[seq/tp, batch, hidden]`` (sequence parallel)."""

    def __init__(self, tp: pstate.Axis) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        mark_sequence_parallel(self.norm)  # replicated weights used on a sequence shard
        self.fc1 = ColumnParallelLinear(HIDDEN, 4 * HIDDEN, group=tp, sequence_parallel=True)
        self.fc2 = RowParallelLinear(4 * HIDDEN, HIDDEN, group=tp, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def main() -> None:
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
        device = ps.device
        torch.manual_seed(0)  # the same seed on every rank: each keeps its slice of the same full weights
        block = Block(ps.tp).to(device)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(1)).to(device)
        shard = x.chunk(ps.tp.size, 0)[ps.tp.rank]
        (block(shard).square().sum() / x.numel()).backward()  # this rank's part of the mean over all of x
        allreduce_sequence_parallel_grads(block, group=ps.tp)

        torch.manual_seed(0)  # the unsharded block from the same seed, on this process alone
        norm, fc1, fc2 = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)
        full = [m.to(device) for m in (norm, fc1, fc2)]
        y = x + full[2](F.gelu(full[1](full[0](x))))
        y.square().mean().backward()
        rows = slice(ps.tp.rank * 2 * HIDDEN, (ps.tp.rank + 1) * 2 * HIDDEN)
        torch.testing.assert_close(block.fc1.weight.grad, full[1].weight.grad[rows])
        torch.testing.assert_close(block.norm.weight.grad, full[0].weight.grad)
        if ps.rank == 0:
            print("sequence-parallel MLP block: gradients equal the unsharded block's")


if __name__ == "__main__":
    main()
