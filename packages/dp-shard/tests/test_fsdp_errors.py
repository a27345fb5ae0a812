"""Bad input to ``fully_shard``: a clear ``DataParallelError`` on every rank, before anything is sharded."""

import torch
import torch.distributed as dist
from torch import nn

from dp_shard.errors import DataParallelError
from dp_shard.fully_shard import fully_shard
from pstate.testing import error_messages


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def wrap_errors():
    rank, world = dist.get_rank(), dist.group.WORLD
    mixed = net()
    mixed[2].double()
    sharded = fully_shard(net(), group=world)
    untouched = net()
    calls = [
        lambda: fully_shard(net().requires_grad_(False), group=world),
        lambda: fully_shard(nn.Sequential(nn.Linear(4, 5 if rank == 1 else 4)), group=world),
        lambda: fully_shard(nn.Sequential(*[nn.Linear(4, 4) for _ in range(2 + rank)]), group=world),
        lambda: fully_shard(untouched, group=world, units=[untouched[0], nn.Linear(4, 4)]),
        lambda: fully_shard(untouched, group=world, units=["0"]),
        lambda: fully_shard(untouched, group=world, units=untouched[0]),
        lambda: fully_shard(mixed, group=world),
        lambda: fully_shard(sharded, group=world),
        lambda: fully_shard(sharded[2], group=world),
        lambda: fully_shard(untouched, group=world, param_dtype=torch.int8),
        lambda: fully_shard(untouched, group=world, prefetch="yes"),
        lambda: fully_shard(lambda x: x, group=world),
    ]
    messages = error_messages(calls, DataParallelError)
    intact = all(p.dim() == 2 for n, p in untouched.named_parameters() if n.endswith("weight"))
    return messages, intact


EXPECTED = [
    (0, ["Sequential has no trainable parameters"]),
    (1, ["rank 1 has '0.weight' of shape [5, 4]", "rank 0 has '0.weight' of shape [4, 4]"]),
    (2, ["rank 1 has 6 trainable parameters, rank 0 has 4"]),
    (3, ["units[1] (Linear) is not a submodule of the Sequential"]),
    (4, ["units[0] is a str, not a torch.nn.Module"]),
    (5, ["units must be a list of submodules", "got Linear"]),
    (6, ["unit '<root>' holds parameters of several dtypes", "torch.float64", "torch.float32"]),
    (7, ["this Sequential is already (partly) fully sharded"]),
    (8, ["this Linear is already (partly) fully sharded"]),
    (9, ["param_dtype=torch.int8 must be a floating-point"]),
    (10, ["prefetch='yes' must be True or False"]),
    (11, ["module must be a torch.nn.Module, got function"]),
]


def test_bad_input_is_a_clear_error_on_every_rank(run_ranks):
    for messages, intact in run_ranks(2, wrap_errors):
        assert intact, "a refused module was changed"
        assert len(messages) == len(EXPECTED)
        for index, words in EXPECTED:
            assert messages[index] is not None, f"call {index} raised nothing"
            for word in words:
                assert word in messages[index], (index, messages[index])
