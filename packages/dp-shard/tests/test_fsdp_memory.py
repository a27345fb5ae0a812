"""Resident parameter bytes of a ``fully_shard`` ed model per rank, between units and after backward.

Measured independently of the implementation's bookkeeping: the sum of the storages behind every
tensor the modules reference (registered parameters, which are the shards, and the attributes that
point at gathered copies), each storage once; a freed gathered copy has a zero-byte storage. The
model is four ``Block`` units and a small root (embedding and head), which stays gathered for the
whole forward. The expected values are computed from the plain model's sizes:

- shards: each unit's parameters padded to a multiple of DP, divided by DP (about 1/DP of the model);
- between two blocks' forwards: shards + the root, plus exactly the next block when prefetching;
- after the backward: the shards alone.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dp_shard.fully_shard import fully_shard

HIDDEN, LAYERS, BYTES = 32, 4, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, HIDDEN)
        self.down = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, HIDDEN)
        self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def resident_parameter_bytes(model: nn.Module) -> int:
    storages: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for tensor in tensors:
            if tensor is not None and tensor.untyped_storage().nbytes():
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def measure(prefetch: bool):
    torch.manual_seed(0)
    model = fully_shard(Net(), group=dist.group.WORLD, units=Block, prefetch=prefetch)
    between: list[int] = []
    for block in model.blocks:  # registered after fully_shard's hooks: runs once the block is freed
        block.register_forward_hook(lambda *_: between.append(resident_parameter_bytes(model)))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(2):  # the second step prefetches in the order the first one recorded
        between.clear()
        model(x).square().mean().backward()
    return between, resident_parameter_bytes(model)


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("prefetch", [False, True])
def test_resident_parameters_are_about_one_over_dp(run_ranks, dp, prefetch):
    plain = Net()
    block = sum(p.numel() for p in plain.blocks[0].parameters())
    root = sum(p.numel() for p in (*plain.embed.parameters(), *plain.head.parameters()))
    total_bytes = (LAYERS * block + root) * BYTES
    shards = (LAYERS * math.ceil(block / dp) + math.ceil(root / dp)) * BYTES
    root_gathered = math.ceil(root / dp) * dp * BYTES
    block_gathered = math.ceil(block / dp) * dp * BYTES
    assert shards < total_bytes / dp + (LAYERS + 1) * BYTES
    expected = [shards + root_gathered + (block_gathered if prefetch else 0)] * (LAYERS - 1)
    expected.append(shards + root_gathered)  # after the last block there is no next block to fetch
    for between, after_backward in run_ranks(dp, measure, prefetch):
        assert between == expected
        assert after_backward == shards
