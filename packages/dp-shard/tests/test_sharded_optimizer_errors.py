"""Bad input to ``ShardedOptimizer``: a clear ``DataParallelError`` before any work, on every rank."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dp_shard import DataParallelError, ShardedOptimizer
from pstate.testing import error_messages


def make(params, optimizer_cls=torch.optim.AdamW, **options):
    return ShardedOptimizer(params, optimizer_cls, group=dist.group.WORLD, **options)


def bad_calls():
    rank = dist.get_rank()
    linear = nn.Linear(4, 4)
    mismatched = nn.Linear(4, 5 if rank == 1 else 4)
    calls = [
        lambda: make(linear.parameters(), stage=3),
        lambda: make(linear.parameters(), torch.optim.LBFGS),
        lambda: make(linear.parameters(), differentiable=True),
        lambda: make(linear.parameters(), betas=(2.0, 0.9)),
        lambda: make(linear.parameters(), fancy=True),
        lambda: make(nn.Linear(4, 4).requires_grad_(False).parameters()),
        lambda: make([linear.weight, ("bias", linear.bias)]),
        lambda: make([{"params": [linear.weight]}, {"params": [linear.weight]}]),
        lambda: make(mismatched.parameters()),
        lambda: make(linear.parameters(), torch.nn.Linear),
    ]
    return error_messages(calls, DataParallelError)


def test_bad_input_is_a_clear_error_on_every_rank(run_ranks):
    expected = [
        "stage=3: ShardedOptimizer does stage 1 or 2 (use fully_shard for 3)",
        "LBFGS is not supported: it evaluates the closure several times per step",
        "differentiable=True is not supported",
        "AdamW refused the options {'betas': (2.0, 0.9)}",
        "AdamW refused the options {'fancy': True}",
        "no trainable parameters",
        "mixes (name, tensor) pairs with bare tensors",
        "a parameter appears twice (param groups 0 and 1)",
        "rank 1 has '0' of shape [5, 4] and dtype float32 where rank 0 has '0' of shape [4, 4]",
        "optimizer_cls must be a torch.optim.Optimizer subclass",
    ]
    for messages in run_ranks(2, bad_calls):
        for message, words in zip(messages, expected, strict=True):
            assert message is not None and words in message, (message, words)


def test_single_process_argument_errors():
    with pytest.raises(DataParallelError, match="not one tensor"):
        ShardedOptimizer(torch.zeros(2, requires_grad=True), torch.optim.SGD, group=None)
    with pytest.raises(DataParallelError, match="bucket_size_mb=0"):
        ShardedOptimizer([torch.zeros(2, requires_grad=True)], torch.optim.SGD, group=None, bucket_size_mb=0)
    with pytest.raises(DataParallelError, match="params is empty"):
        ShardedOptimizer([], torch.optim.SGD, group=None)
